"""Weight-only int8 for the native Llama path: made once per model, cached, checked on every load.

Why int8 weights: a batch-1 decode step reads every weight once for one row of activations, so
its matmuls are bound by how fast the weights stream. torch's CPU kernel `_weight_int8pack_mm`
(int8 weights, bf16 activations, one scale per output channel) reads half the bytes of bf16;
measured here 1.3-5x faster per projection than the oneDNN-prepacked bf16 weights for 1 row.
From ~4 rows on it is slower (64 rows: 3x slower), so prefills and wide batched steps run the
same int8 weights dequantized once into the prepacked bf16 layout (see native_llama.Linear):
both kernels compute with the same int8 values, only the summation differs.

Scheme: per output channel (row) symmetric, one bf16 scale per row (see quantize_int8), the
int8 values rounded by GPTQ on built-in calibration chats (core/gptq.py; round-to-nearest
missed the gate's top-1 goal).
Quantized: every decoder projection, and the LM head for the few-row (decode) path only (see
quantized_names). The quality gate is benchmarks/bench_quant_quality.py.

Cache: `$VICUNA_HOME/models/.quantized/<model>-<key>/` holds `int8.safetensors` and a manifest
with its size and CRC-32 and the source checkpoint's file sizes and mtimes. A copy whose size or
hash does not match (truncated, corrupt) or whose source changed is rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any, Literal

from . import console
from .errors import VicunaError
from .store import atomic_dir, dir_size, exclusive, human_size, models_dir

QUANTIZATIONS = ("auto", "int8", "none")
Quantize = Literal["auto", "int8", "none"]
QUANTIZE_HELP = "Weights: none (lossless), int8 (native Llama path, CPU, bf16), or auto (int8 where it can run, else none)."
MANIFEST = "manifest.json"
WEIGHTS = "int8.safetensors"
FORMAT = 5  # 5: + the LM head (4: projections by GPTQ, 3: round-to-nearest): an older copy is rebuilt


HEAD = "lm_head.weight"


def quantized_names(state_keys: list[str]) -> list[str]:
    """The weights that get int8 copies: the decoder projections and the LM head (`HEAD`, named
    even where the checkpoint ties it to the embedding and so has no tensor of that name).

    The head is 49,152 x 576 for SmolLM2: 56 MB of bf16 read per decode step. Its int8 copy
    (GPTQ-rounded on the final norm's outputs, like the projections) runs only for the one to
    four rows of a decode step, and its 16 best logits per row are computed again from the exact
    rows (native_llama: NativeLlamaForCausalLM._rescore); a prefill runs the exact head. Those
    rows are kept anyway (the tied embedding's, or the head's own). Gate, decode path: int8 head
    alone top-1 97.14 % (projections only: 97.29 %), rescored: BENCHMARKS.md."""
    return [k for k in state_keys if k.startswith("model.layers.") and k.endswith("_proj.weight")] + [HEAD]


CLIP_STEPS = 17  # candidate clipping ratios 0.6 .. 1.0 of max|w|


def quantize_int8(weight: Any, importance: Any = None) -> tuple[Any, Any]:
    """Per-row symmetric int8 of a [out, in] weight: (q int8 [out, in], scale bf16 [out]).

    The scale of each row is the one, among max|w| x 0.6 .. 1.0 / 127, whose q x scale is
    nearest the row (least squares): clipping the few largest weights shrinks every other
    weight's rounding step. On the gate's first 3 prompts this took top-1 agreement from
    94.4 to 99.2 % (stepwise) against plain max|w| scales. Scales are rounded to bf16 before
    quantizing against them, since the kernel multiplies by the bf16 scale. `importance` [in]:
    a weight per input column in that least-squares error (GPTQ passes the mean square of each
    input over the calibration chats: an error on an input that is often large costs more)."""
    import torch

    w = weight.float()
    importance = torch.ones(w.shape[1]) if importance is None else importance.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    best_q = best_scale = best_err = None
    for ratio in torch.linspace(0.6, 1.0, CLIP_STEPS).tolist():
        scale = (amax * ratio / 127.0).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
        err = (q * scale.float()[:, None] - w).square() @ importance
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_scale


def dequantize(q: Any, scale: Any, dtype: Any) -> Any:
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------
# Choosing


def unavailable_reason(implementation: str, device: str, dtype: str) -> str | None:
    """Why int8 weights cannot run for this load, or None when they can."""
    import torch

    if implementation != "native":
        return f"the {implementation} implementation runs the checkpoint's own weights (int8 runs on the native Llama path only)"
    if device != "cpu":
        return f"device {device} (the int8 weight kernel used here is the CPU one)"
    if dtype != "bfloat16":
        return (f"dtype {dtype}: the CPU int8 kernel computes with bfloat16 activations "
                "(with float32 ones it measured 5-15x slower per projection than bf16 weights here)")
    if not hasattr(torch, "_weight_int8pack_mm"):
        return f"this torch ({torch.__version__}) has no _weight_int8pack_mm kernel"
    return None


# `auto` builds an int8 copy by itself only for checkpoints up to this size: GPTQ made SmolLM2-135M's
# (270 MB in bf16) in 23-45 s on this 2-core CPU, and its cost grows with the parameters (the
# calibration forwards) and faster (each projection's Hessian), so a 7B model would wait tens of
# minutes on its first chat. A larger model uses an int8 copy once one is cached (`--quantize int8`).
AUTO_BUILD_MAX_BYTES = 1_500_000_000


def pick_quantization(requested: str, implementation: str, device: str, dtype: str,
                      model_dir: Path | None = None) -> tuple[str, str]:
    """(quantization, why). `auto` (the commands' default since the int8 weights pass the
    100-prompt gate of BENCHMARKS.md on both paths): int8 wherever it can run and its copy is
    cached or quick to make (AUTO_BUILD_MAX_BYTES), else none. `int8` where it cannot run is an
    error, not a silent fall-back: the user asked for it."""
    if requested not in QUANTIZATIONS:
        from .errors import unknown_choice

        raise unknown_choice("quantization", requested, list(QUANTIZATIONS))
    if requested == "none":
        return "none", "requested"
    reason = unavailable_reason(implementation, device, dtype)
    if requested == "int8":
        if reason:
            raise VicunaError(f"--quantize int8 is not possible here: {reason}",
                              hint="use --quantize none (or auto, which falls back to unquantized weights)")
        return "int8", "requested"
    if reason:
        return "none", reason
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) if model_dir is not None else 0
    if size > AUTO_BUILD_MAX_BYTES and cache_problem(cache_dir(model_dir), model_dir) is not None:
        return "none", (f"no int8 copy cached, and making one for a {size / 1e9:.1f} GB checkpoint takes long: "
                        "build it once with --quantize int8")
    return "int8", "auto"


# ---------------------------------------------------------------------------------------------
# The cache


def cache_dir(model_dir: Path, quantization: str = "int8") -> Path:
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:10]
    return models_dir() / ".quantized" / f"{model_dir.name}-{key}-{quantization}"


def source_fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Sizes and mtimes of the files the int8 copy is made from: a retrained model in the same
    folder gets a new copy."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}


def checksum(data: bytes) -> str:
    """CRC-32: it catches truncation and flipped bits (the cache is the user's own: no adversary),
    and it is the load's cost on every start: 0.18 s for SmolLM2's 106 MB on this loaded box,
    where sha256 took 0.70 s."""
    return f"{zlib.crc32(data):08x}"


def cache_problem(directory: Path, model_dir: Path, data: bytes | None = None) -> str | None:
    """Why the cached copy in `directory` cannot be used (None: it can). `data`: the weights
    file's bytes when the caller has read them already."""
    manifest_path, weights = directory / MANIFEST, directory / WEIGHTS
    if not manifest_path.is_file() or not weights.is_file():
        return "incomplete"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            return "older format"
        size, digest = int(manifest["size"]), manifest["crc32"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unreadable manifest"
    if manifest.get("source") != source_fingerprint(model_dir):
        return "the source model changed"
    if weights.stat().st_size != size:
        return f"truncated ({weights.stat().st_size} of {size} bytes)"
    if checksum(weights.read_bytes() if data is None else data) != digest:
        return "checksum mismatch"
    return None


def build(model_dir: Path, state: dict[str, Any], directory: Path) -> None:
    """Quantize `state`'s (fused) projections and write them with a manifest, atomically."""
    from safetensors.torch import save_file

    from .gptq import quantize_model

    started = time.perf_counter()
    console.info(f"making the int8 weights of {Path(model_dir).name} once (GPTQ on built-in chats; ~25 s of one CPU for 135M)")
    tensors: dict[str, Any] = {}
    for name, (q, scale) in quantize_model(model_dir, state, quantized_names(list(state)), quantize_int8).items():
        tensors[name] = q
        tensors[name.removesuffix(".weight") + ".scale"] = scale
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        manifest = {
            "format": FORMAT,
            "quantization": "int8",
            "scheme": "per-output-channel symmetric, least-squares clipped bf16 scales, GPTQ rounding (core/gptq.py)",
            "source": source_fingerprint(model_dir),
            "source_dir": str(Path(model_dir).resolve()),
            "size": (tmp / WEIGHTS).stat().st_size,
            "crc32": checksum((tmp / WEIGHTS).read_bytes()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    console.info(f"int8 weights made once in {time.perf_counter() - started:.1f} s, cached in {directory}")


def load_int8(model_dir: Path, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{weight name: (q, scale)} for the projections in `state`, from the cache (made if needed)."""
    from safetensors.torch import load as load_bytes

    directory = cache_dir(model_dir)
    weights = directory / WEIGHTS
    data = weights.read_bytes() if weights.is_file() else None  # read once: checked, then parsed
    problem = cache_problem(directory, model_dir, data) if directory.exists() else None
    if problem is not None:
        console.warn(f"the cached int8 copy in {directory} is not usable ({problem}); rebuilding it")
    if problem is not None or not directory.exists():
        try:
            # One process builds, the others wait and then use its copy (serve workers start together).
            with exclusive(directory.parent / f".{directory.name}.lock", f"the int8 copy {directory}", console.warn):
                if cache_problem(directory, model_dir) is not None:
                    build(model_dir, state, directory)
        except OSError as exc:
            raise VicunaError(f"could not write the int8 copy to {directory}: {exc.strerror or exc}",
                              hint="free space or fix permissions in $VICUNA_HOME, or use --quantize none") from None
        data = weights.read_bytes()
    tensors = load_bytes(data)
    out = {}
    for name in quantized_names(list(state)):
        base = name.removesuffix(".weight")
        if name not in tensors or base + ".scale" not in tensors:
            raise VicunaError(f"the cached int8 copy in {directory} lacks {name}",
                              hint=f"delete {directory} (it is rebuilt on the next load)")
        out[name] = (tensors[name], tensors[base + ".scale"])
    return out


def cached_copies() -> list[tuple[str, str, Path, str]]:
    """(model dir name, quantization, cache dir, size) of every cached quantized copy."""
    root = models_dir() / ".quantized"
    rows = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            source = Path(manifest["source_dir"]).name
            quantization = manifest["quantization"]
        except (OSError, ValueError, KeyError):
            source, quantization = directory.name, "incomplete (rebuilt on next use)"
        rows.append((source, quantization, directory, human_size(dir_size(directory))))
    return rows


# ---------------------------------------------------------------------------------------------
# The quality gate's measure (benchmarks/bench_quant_quality.py, tests/test_quantize.py)


def fresh_positions(ids: list[int], seen: set[tuple[int, ...]]) -> list[int]:
    """The positions of `ids` whose context (the tokens up to and including them) is not in
    `seen`, which then holds them: the quality gate counts each distinct context once, since
    every rendered prompt repeats the template's prefix (a system prompt), and one near-tie there
    would otherwise count once per prompt."""
    fresh = [i for i in range(len(ids)) if tuple(ids[: i + 1]) not in seen]
    seen.update(tuple(ids[: i + 1]) for i in fresh)
    return fresh


def next_token_divergence(reference: Any, candidate: Any, ids: list[int], stepwise: bool = True) -> tuple[list[float], list[bool]]:
    """KL(reference || candidate) of the next-token distribution and whether the top-1 tokens
    agree, at every position of `ids`. `stepwise`: one token per forward through the KV cache,
    so every position runs the decode path (for int8: the one-row int8 kernel); else one
    full forward (the prefill path: more rows than INT8_MAX_ROWS, the dequantized weights)."""
    import torch

    def logits(model: Any) -> Any:
        with torch.inference_mode():
            if not stepwise:
                return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
            cache = model.new_cache(len(ids) + 1)
            return torch.cat([model(input_ids=torch.tensor([[t]]), past_key_values=cache).logits[0].float() for t in ids])

    ref, cand = logits(reference).log_softmax(-1), logits(candidate).log_softmax(-1)
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp(min=0)
    return kl.tolist(), (ref.argmax(-1) == cand.argmax(-1)).tolist()
