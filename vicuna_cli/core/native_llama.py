"""A lean Llama-architecture decoder for fast starts on CPU (inference only).

Why not transformers here: importing transformers 5 and its model-loading stack costs ~2.5 s on a
2-core machine, which alone breaks the 3-second cold start of `vicuna chat`. This module needs
only torch, safetensors and the model's config.json, and computes the same function as
transformers' LlamaForCausalLM (tests compare logits on random and real checkpoints). Anything it
does not support (other architectures, rope scaling variants, biases it does not know) is refused
by `unsupported_reason`, and models.py then loads with transformers instead.

Longer than the house's ~450 lines: one model, its load and the weight layouts its kernels need
(packed, column-major, int8), which change together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import Rows, Segments, SlotKVCache


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why this checkpoint cannot use the native path, or None when it can."""
    if config.get("model_type") != "llama":
        return f"model_type {config.get('model_type')!r} (native path: llama only)"
    # transformers 5 writes `rope_parameters`; older checkpoints `rope_scaling`: check both.
    for rope in (config.get("rope_parameters"), config.get("rope_scaling")):
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if rope_type not in (None, "default"):
            return f"rope scaling {rope_type!r}"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "biases in attention or MLP"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if config.get("pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


def shape_from_config(config: dict[str, Any]) -> LlamaShape:
    rope = config.get("rope_parameters") or {}
    heads = config["num_attention_heads"]
    return LlamaShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


# Row counts the fp32 CPU lm_head pads (see NativeLlamaForCausalLM._logits).
LM_HEAD_PAD_FROM, LM_HEAD_PAD_TO = 8, 16
# Up to this many rows an int8 Linear runs torch's int8 kernel, above it the packed bf16 copy:
# per SmolLM2 projection, 1 row 1.3-5x faster in int8, 4 rows about equal, 16 rows 2x slower.
INT8_MAX_ROWS = 4
# An int8 LM head's leading candidates per row whose logits are computed again from the exact rows
# (NativeLlamaForCausalLM._rescore).
RESCORE_TOP = 16


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)  # inference only, like Linear
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm (normalised in fp32, rounded, then scaled), bitwise; torch's
        # rms_norm does the five fp32 ops in one call (61 norms per SmolLM2 decode step).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)


class Attention(nn.Module):
    """q, k and v come from one fused projection (`qkv_proj`, the checkpoint's q_proj, k_proj and
    v_proj weights stacked by `load_native`): one matmul instead of three per layer, and the
    rotary embedding turns the query and key heads in one pass."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        self.qkv_proj = Linear(s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim)
        self.o_proj = Linear(s.num_heads * s.head_dim, s.hidden_size)

    def forward(self, x, cos, sin, cache: SlotKVCache | None, layer: int, where: "int | Rows | Segments", slot: int = 0) -> torch.Tensor:
        """`where` is the start position of a chunk of one sequence (in `slot`), the Rows of a
        batched decode step (one token per row), or the Segments of a ragged prefill (chunks of
        several sequences, concatenated: one pass through the weights, attention per chunk)."""
        b, n, _ = x.shape
        s = self.s
        heads = self.qkv_proj.forward(x).view(b, n, s.num_heads + 2 * s.num_kv_heads, s.head_dim).transpose(1, 2)
        qk, v = heads[:, : s.num_heads + s.num_kv_heads], heads[:, s.num_heads + s.num_kv_heads :]
        qk = qk * cos + qk.roll(s.head_dim // 2, -1) * sin  # rotate_half by a roll: `sin` is signed (_rope)
        q, k = qk[:, : s.num_heads], qk[:, s.num_heads :]
        if isinstance(where, Rows):
            k, v = cache.write_rows(layer, where, k, v)
            out = self._one_query(q, k, v, where.mask)
        elif isinstance(where, Segments):
            parts = [
                self._chunk(q[:, :, o : o + m], k[:, :, o : o + m], v[:, :, o : o + m], cache, layer, slot_, start)
                for slot_, start, m, o in where
            ]
            out = torch.cat(parts, dim=2)
        else:
            out = self._chunk(q, k, v, cache, layer, slot, where)
        return self.o_proj.forward(out.transpose(1, 2).reshape(b, n, -1))

    def _chunk(self, q, k, v, cache: SlotKVCache | None, layer: int, slot: int, start: int) -> torch.Tensor:
        """Attention for n new positions start.. of one sequence: [1, heads, n, d]."""
        n = q.shape[2]
        if cache is not None:
            k, v = cache.write_chunk(layer, slot, k, v, start)
        if n == 1:
            return self._one_query(q, k, v, None)
        mask, causal = None, True
        if start > 0:  # a chunk after a cached prefix: causal inside the chunk only
            mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
            causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    def _one_query(self, q, k, v, mask) -> torch.Tensor:
        """One query per row ([b, heads, 1, d]): the query heads that share a key/value head become
        that head's "positions" ([b, kv_heads, group, d]), which needs no key/value expansion.
        Same result as enable_gqa; measured here 4-40x faster in bf16 (B=1, L=100: 0.35 -> 0.08
        ms; B=16, L=400: 64 -> 1.7 ms per call) and ~1.2x in fp32."""
        b, s = q.shape[0], self.s
        group = s.num_heads // s.num_kv_heads
        out = F.scaled_dot_product_attention(q.reshape(b, s.num_kv_heads, group, s.head_dim), k, v, attn_mask=mask)
        return out.reshape(b, s.num_heads, 1, s.head_dim)


class Linear(nn.Module):
    """nn.Linear without bias and without random init: the weights always come from a checkpoint.
    (Initialising, even on the meta device, pulls in torch's decomposition machinery: ~2 s.)"""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy (see pack_weights)
        self.qweight: torch.Tensor | None = None  # int8 [out, in] and bf16 scales [out] (core/quantize.py)
        self.scales: torch.Tensor | None = None

    def set_int8(self, q: torch.Tensor, scales: torch.Tensor, dequantize: bool = True) -> None:
        """Run on int8 weights: the int8 kernel for a few rows, and for more the same values
        dequantized into `weight` (packed by pack_weights like any bf16 weight); with
        `dequantize=False` (the LM head, quantize.quantized_names says why) more rows run on
        the original `weight`, kept."""
        self.qweight, self.scales = q.contiguous(), scales.to(torch.bfloat16).contiguous()
        if dequantize:
            self.weight = nn.Parameter((q.float() * self.scales.float()[:, None]).to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            rows = x.numel() // x.shape[-1]
            if rows <= INT8_MAX_ROWS:
                out = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.qweight, self.scales)
                return out.view(*x.shape[:-1], out.shape[-1])
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class MLP(nn.Module):
    """gate and up in one fused projection (`gate_up_proj`: gate_proj's rows, then up_proj's)."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.intermediate = s.intermediate_size
        self.gate_up_proj = Linear(s.hidden_size, 2 * s.intermediate_size)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, where, slot=0):
        # .forward(), not __call__: nn.Module's call machinery (hooks) cost ~1 us per call, ~300 calls
        # per token, 3 % of a 135M model's int8 decode step; hooks are not honoured (gptq.py wraps
        # `forward` itself to see a projection's inputs)
        x = x + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, cache, layer, where, slot)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class Backbone(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class NativeLlamaForCausalLM(nn.Module):
    """Same parameter names as transformers' LlamaForCausalLM, so checkpoints load unchanged."""

    def __init__(self, config: dict[str, Any], generation_config: dict[str, Any] | None = None):
        super().__init__()
        self.shape = s = shape_from_config(config)
        self.model = Backbone(s)
        self.lm_head = Linear(s.hidden_size, s.vocab_size)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.config = SimpleNamespace(**config)
        self.generation_config = SimpleNamespace(**(generation_config or {}))
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def new_cache(self, capacity: int, num_slots: int = 1, max_capacity: int | None = None) -> SlotKVCache:
        return SlotKVCache(self.shape.num_layers, num_slots, capacity, max_capacity)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a signed sin for `positions` (any shape) -> [*positions.shape, head_dim].

        transformers turns x by x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
        Here the first half of sin is negated once per step, so that the turn is
        x * cos + roll(x, head_dim / 2) * sin: bitwise the same (a sign is exact), one op per
        layer instead of four (two slices, a negation, a cat)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def _logits(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        x = self.model.norm.forward(x)
        if keep:
            x = x[:, -keep:]
        # lm_head on a contiguous 2-D tensor: a [b, 1, hidden] slice of a longer sequence keeps
        # its batch stride, and in bf16 on CPU F.linear then copies the whole (tied, 49152 x 576)
        # weight for a bmm — measured 102 -> 56 ms for SmolLM2's prefill.
        b, n, h = x.shape
        x = x.reshape(b * n, h)
        rows = b * n
        if x.device.type == "cpu" and x.dtype == torch.float32 and LM_HEAD_PAD_FROM <= rows < LM_HEAD_PAD_TO:
            # MKL's sgemm against the row-major (tied) 49152 x 576 head takes 37-62 ms for 8-15
            # rows but 26 ms for 16 (a different kernel from 16 on): 16 rows, zeros at the end.
            x = torch.cat((x, x.new_zeros(LM_HEAD_PAD_TO - rows, h)))
        logits = self.lm_head.forward(x)[:rows]
        if self.lm_head.qweight is not None and rows <= INT8_MAX_ROWS:
            logits = self._rescore(x, logits)
        return logits.view(b, n, -1)

    def _rescore(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The int8 head's RESCORE_TOP best logits per row, computed again from the head's exact
        rows (kept: load_native, pack_weights): the int8 head shortlists, the exact rows decide.
        Its rounding error fell on every logit; the leading ones are where a greedy pick and almost
        all of a sampler's probability are (gate, decode path: top-1 97.14 % without this)."""
        top = logits.topk(RESCORE_TOP, dim=-1).indices  # [rows, k]
        # in fp32: 16 dot products per row (bf16 bmm took 3x as long here), rounded once
        exact = torch.bmm(self.lm_head.weight[top].float(), x.float()[:, :, None])[..., 0]
        return logits.scatter_(-1, top, exact.to(logits.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: SlotKVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        slot: int = 0,
    ) -> SimpleNamespace:
        """A chunk of one sequence (batch 1 when cached), continuing slot `slot` of the cache."""
        cache = past_key_values if use_cache else None
        start = cache.lengths[slot] if cache is not None else 0
        n = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(torch.arange(start, start + n, device=self.inv_freq.device), x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward(x, cos, sin, cache, i, start, slot)
        if cache is not None:
            cache.lengths[slot] = start + n
        return SimpleNamespace(logits=self._logits(x, logits_to_keep))

    def prefill_segments(self, chunks: list[tuple[int, list[int]]], cache: SlotKVCache) -> torch.Tensor:
        """Prefill chunks of several sequences in one forward: chunk (slot, ids) continues `slot`
        from its current length. Linear layers see all tokens at once (the weights are read once:
        a 30-token prefill costs ~230 ms on this CPU, 480 tokens ~2 s, not 16 x 230 ms), attention
        runs per chunk. Returns each chunk's next-token logits, [len(chunks), vocab]."""
        device = self.inv_freq.device
        segments = Segments([s for s, _ in chunks], [cache.lengths[s] for s, _ in chunks], [len(ids) for _, ids in chunks])
        tokens = torch.tensor([[t for _, ids in chunks for t in ids]], device=device)
        positions = torch.cat([torch.arange(a, a + m, device=device) for a, m in zip(segments.starts, segments.lengths)])
        x = self.model.embed_tokens(tokens)
        cos, sin = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward(x, cos, sin, cache, i, segments)
        for slot, start, m, _ in segments:
            cache.lengths[slot] = start + m
        last = torch.tensor([o + m - 1 for o, m in zip(segments.offsets, segments.lengths)], device=device)
        return self._logits(x[:, last], 0)[0]

    def decode_rows(self, tokens: list[int], cache: SlotKVCache, slots: list[int]) -> torch.Tensor:
        """One decode step for several sequences at once: row b appends `tokens[b]` to slot
        `slots[b]` (each at its own position). Returns next-token logits [B, vocab]."""
        device = self.inv_freq.device
        rows = Rows.make(slots, [cache.lengths[s] for s in slots], device)
        x = self.model.embed_tokens(torch.tensor(tokens, device=device)[:, None])
        cos, sin = self._rope(rows.positions[:, None, None], x.dtype)  # [B, 1, 1, d]: per-row positions
        for i, layer in enumerate(self.model.layers):
            x = layer.forward(x, cos, sin, cache, i, rows)
        for s in slots:
            cache.lengths[s] += 1
        return self._logits(x, 1)[:, -1]


def load_native(model_dir: Path, dtype: torch.dtype, device: str, quantize: str = "none",
                batch_rows: int = 1) -> NativeLlamaForCausalLM:
    """Build the module with uninitialised weights and fill it from the safetensors shards.
    `quantize="int8"`: the projections and LM head run on int8 weights, made once and cached
    (core/quantize.py; the caller checked that this load can run them: CPU, bf16). `batch_rows`:
    the most rows a step will run (a serve worker's batch); above 1, fp32 weights on CPU are
    oneDNN-packed for batched steps (pack_weights) instead of stored column-major."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    model = NativeLlamaForCausalLM(config, generation)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard, device="cpu"))
    state = fuse_projections(state, model.shape.num_layers)
    int8 = None
    if quantize == "int8":
        from .quantize import HEAD, load_int8

        int8 = load_int8(model_dir, state)  # set_int8 below replaces those weights
    packed = packs(device, dtype, batch_rows)
    column_major = device == "cpu" and dtype == torch.float32 and not packed
    state = {k: _weight(v, dtype, column_major and _is_decoder_linear(k)) for k, v in state.items()
             if not k.endswith("rotary_emb.inv_freq")}
    if model.shape.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state  # the module holds what it needs: packing below can then free each weight it replaces
    missing = [m for m in missing if not (m == "lm_head.weight" and model.shape.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match a Llama model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, (q, scales) in (int8 or {}).items():
        model.get_submodule(name.removesuffix(".weight")).set_int8(q, scales, dequantize=name != HEAD)
    model = model.to(device).eval()
    if packed:
        pack_weights(model)
    return model


PACK_ROWS_FP32 = 16  # oneDNN's batch hint for fp32 packing (see pack_weights)


def packs(device: str, dtype: torch.dtype, batch_rows: int) -> bool:
    """Whether the projections run on oneDNN-packed weights (pack_weights says why): bf16 on
    CPU always, fp32 on CPU for batched steps (`batch_rows` > 1), never elsewhere."""
    return device == "cpu" and (dtype == torch.bfloat16 or (dtype == torch.float32 and batch_rows > 1))


def pack_weights(model: NativeLlamaForCausalLM) -> bool:
    """bf16, or fp32 for batched steps, on CPU: every Linear runs on a oneDNN-prepacked (blocked)
    copy of its weight.

    bf16: F.linear on a plain bf16 weight streams it at ~11 GB/s here for a decode step's one row
    (and no faster on 2 threads), while a sum over the same bytes reads at 21-35 GB/s: the kernel,
    not the memory, was the limit. The prepacked weights stream at ~18 GB/s (80 x [3072, 576]
    weights, one row: 25.8 -> 15.4 ms), with outputs bitwise equal to F.linear's (checked for 1-256
    rows). The packing's batch hint makes no difference in bf16 (1 vs 16, 1-16 rows).
    fp32 (load_native's `batch_rows` > 1: serve workers, PPO rollouts): packed with a hint of 16,
    SmolLM2's projections ran 2-3.7x faster than F.linear (or the column-major layout) for 2-64
    rows (one thread, 2026-12-03: [3072, 576] at 8 rows 0.43 -> 0.15 ms; the tied 49,152-row head
    at 16 rows 31.7 -> 8.5 ms), but 10-20 % slower for one row, hence not for chat's batch of one.
    Packed with a hint of 1, fp32 gained far less (2-8 rows: 1.0-1.5x). fp32 results differ from
    F.linear's by summation order only (<= 2e-4 absolute on these shapes).
    The plain weights of the decoder layers are dropped once packed (the memory stays the same);
    the tied lm_head keeps the embedding's (its row lookups need them), so that copy costs
    vocab x hidden more. Returns False, changing nothing, where oneDNN cannot pack."""
    if not torch.backends.mkldnn.is_available():
        return False
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    dtype = linears[0].weight.dtype
    rows_hint = PACK_ROWS_FP32 if dtype == torch.float32 else 1
    try:  # one weight first: a torch without these ops (or this CPU) changes nothing
        first = torch.ops.mkldnn._reorder_linear_weight(linears[0].weight.detach(), rows_hint)
        probe = torch.ones(1, linears[0].weight.shape[1], dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(probe, first, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    embedding = model.model.embed_tokens.weight
    for module in linears:  # one at a time, each plain weight freed at once: a lower peak
        module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows_hint)
        # A tied head's rows are the embedding's: kept; an int8 head's too (they rescore it).
        if module.weight is not embedding and not (module is model.lm_head and module.qweight is not None):
            module.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    # What is left (embedding, norms) may be views of the checkpoint file's mapping, which packing
    # paged in whole: own copies let the mapping go (measured: 361 MB of file pages -> 96).
    for param in model.parameters():
        if param.numel():
            param.data = param.data.clone()
    if model.shape.tie_word_embeddings:  # its int8 copy (decode) does not replace these rows
        model.lm_head.weight = model.model.embed_tokens.weight
    from .runners import trim_heap

    trim_heap()  # the fused projections' plain weights were freed into malloc's heap
    return True


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The checkpoint's separate q/k/v and gate/up weights stacked into the fused projections
    (rows in that order: each output is the same dot product as before). Parts that are missing
    stay missing, so load_state_dict names what the checkpoint lacks."""
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for fused, parts in FUSED.items():
            names = [f"{prefix}{part}.weight" for part in parts]
            if all(name in state for name in names):
                state[f"{prefix}{fused}.weight"] = torch.cat([state.pop(name) for name in names])
    return state


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _weight(tensor: torch.Tensor, dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """A checkpoint tensor in `dtype`; `column_major`: stored transposed in memory (same values
    and shape), for the decoder layers' fp32 weights on CPU.

    F.linear then runs MKL's NN GEMM instead of NT, which on CPU is 1.4-2x faster for the 4-32
    rows of a batched decode step (576->1536 at 16 rows: 0.52 -> 0.37 ms; whole SmolLM2 step at
    batch 16: 285 -> 237 ms) and no slower for batch 1 or a prefill. Not for fp16 (7-9x slower)
    nor bf16 (no gain), and not for lm_head: it is tied to the embedding, whose row gathers want
    the row-major layout. One strided copy converts and transposes at once: a `.to()` followed
    by `.t().contiguous()` took 1.0 s of SmolLM2's 1.5 s load here.
    """
    if not column_major or tensor.dim() != 2:
        return tensor.to(dtype)
    return torch.empty(tensor.shape[::-1], dtype=dtype).t().copy_(tensor)

