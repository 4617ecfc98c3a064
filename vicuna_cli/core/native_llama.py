"""A lean Llama-architecture decoder for fast starts on CPU (inference only).

Why not transformers here: importing transformers 5 and its model-loading stack costs ~2.5 s on a
2-core machine, which alone breaks the 3-second cold start of `vicuna chat`. This module needs
only torch, safetensors and the model's config.json, and computes the same function as
transformers' LlamaForCausalLM (tests compare logits on random and real checkpoints). Anything it
does not support (other architectures, rope scaling variants, biases it does not know) is refused
by `unsupported_reason`, and models.py then loads with transformers instead.
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


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Per-layer key/value buffers, preallocated and grown by doubling (batch 1)."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = max(capacity, 16)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens stored (same for every layer after a full forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[2]:
            size = max(self.capacity, end) if buf_k is None else max(2 * buf_k.shape[2], end)
            new_k = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        self.q_proj = Linear(s.hidden_size, s.num_heads * s.head_dim)
        self.k_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim)
        self.v_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim)
        self.o_proj = Linear(s.num_heads * s.head_dim, s.hidden_size)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        b, n, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(b, n, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        mask, causal = None, n > 1
        if n > 1 and start > 0:  # a chunk after a cached prefix: causal inside the chunk only
            mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Linear(nn.Module):
    """nn.Linear without bias and without random init: the weights always come from a checkpoint.
    (Initialising, even on the meta device, pulls in torch's decomposition machinery: ~2 s.)"""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = Linear(s.hidden_size, s.intermediate_size)
        self.up_proj = Linear(s.hidden_size, s.intermediate_size)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.shape.num_layers, capacity)

    def _rope(self, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> SimpleNamespace:
        cache = past_key_values if use_cache else None
        start = cache.length if cache is not None else 0
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(start, input_ids.shape[1], x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, start)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.lm_head(x))


def load_native(model_dir: Path, dtype: torch.dtype, device: str) -> NativeLlamaForCausalLM:
    """Build the module with uninitialised weights and fill it from the safetensors shards."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    model = NativeLlamaForCausalLM(config, generation)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard, device="cpu"))
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.shape.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.shape.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match a Llama model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()
