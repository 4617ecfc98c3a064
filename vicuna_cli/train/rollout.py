"""PPO rollouts with the project's own engine (core/batch.py: continuous batching), at the
policy's CURRENT weights, without saving and reloading the model each step.

Llama-family policies run on the native fast path (core/native_llama.py), rebuilt at every
rollout step from the policy's live tensors: embeddings, norms, o_proj, down_proj and lm_head are
the policy's own storage (`load_state_dict(assign=True)` wraps it: the optimizer's in-place
updates are what the next rollout samples from), while the engine's fused q/k/v and gate/up
projections are stacked into fresh tensors once per step (one matmul each instead of five). On
CPU, a batch of prompts then runs every projection on a oneDNN-packed copy made in the same
rebuild (fp32: 2-3.7x faster for 2-64 rows than the plain tensors; native_llama.pack_weights).
With --lora the adapted layers are merged (W + B·A·s) into fresh tensors the same way.
A bf16 rollout dtype samples from a bf16 copy of an fp32 policy instead (oneDNN-prepacked on CPU,
the engine's fast path), and `--rollout-dtype auto` picks it wherever the device computes bf16
natively (core/placement.pick_dtype: CPUs with AVX512-BF16/AMX, CUDA with bf16), as RLHF stacks
that sample with vLLM in bf16 do. PPO stays correct because the old log-probs are recomputed by
the training policy itself. On the tiny test policy (tests/test_train_ppo_runs.py, 3 seeds) the
programmatic reward rose 7.3-7.9x in 20 steps with bf16 rollouts and 5.0-8.5x with fp32 ones.
Other architectures run the engine's transformers path over the
policy itself. Every prompt has its own seeded sampler (seed from --seed, the step and the
prompt's place), so a resumed run draws the same answers as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .modeling import causal_lm


@dataclass
class Answer:
    ids: list[int]  # the answer's tokens, the stop token included when the model stopped
    finish_reason: str


def sampling_dtype(requested: str, policy_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype the rollouts sample in, or None for the policy's own tensors (shared, no copy).
    `auto`: bf16 where `device` computes it natively and the policy holds more precise weights
    (fp32: at train ppo's default batch of 64 a bf16 copy sampled 3.1x as fast as
    `model.generate`, the policy's own fp32 tensors 2.0x; BENCHMARKS.md), else its own."""
    from ..core.placement import pick_dtype

    name = pick_dtype(str(device), "auto") if requested == "auto" else requested
    dtype = getattr(torch, name)
    if dtype == policy_dtype or (requested == "auto" and dtype.itemsize >= policy_dtype.itemsize):
        return None
    return dtype


def native_policy(model: Any, dtype: torch.dtype | None = None, batch_rows: int = 1) -> Any | None:
    """A native Llama model over the policy's current weights, or None when the architecture is
    not one the native path computes. `batch_rows` > 1 on CPU: fp32 projections run on
    oneDNN-packed copies made here (2-3.7x faster for batched steps, native_llama.pack_weights)
    instead of the policy's own tensors."""
    from ..core.native_llama import NativeLlamaForCausalLM, fuse_projections, pack_weights, packs, unsupported_reason

    lm = causal_lm(model)
    config = lm.config.to_dict()
    if unsupported_reason(config) is not None:
        return None
    native = NativeLlamaForCausalLM(config, lm.generation_config.to_dict() if lm.generation_config else {})
    state = {k: v for k, v in live_state(model).items() if not k.endswith("rotary_emb.inv_freq")}
    if native.shape.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if dtype is None:
        state = fuse_projections(state, native.shape.num_layers)
    else:
        state = converted(state, native.shape.num_layers, dtype)
    missing, unexpected = native.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and native.shape.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"the policy does not map onto the native Llama model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if native.shape.tie_word_embeddings:
        native.lm_head.weight = native.model.embed_tokens.weight
    device = next(lm.parameters()).device
    native = native.to(device).eval()
    if packs(device.type, native.lm_head.weight.dtype, batch_rows):
        pack_weights(native)  # the engine's CPU fast path, by load_native's rule
    return native


@torch.no_grad()
def converted(state: dict[str, torch.Tensor], num_layers: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` in `dtype` with the fused projections, each weight read once: the parts are copied
    (and converted) straight into their slice of the fused tensor, not converted and then
    concatenated (the rebuild is paid every rollout step: with SmolLM2-135M in bf16 it was a
    fifth of a 32-token rollout). A tensor already in `dtype` stays shared."""
    from ..core.native_llama import FUSED

    out = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for fused, parts in FUSED.items():
            names = [f"{prefix}{part}.weight" for part in parts]
            if not all(name in state for name in names):
                continue  # left for load_state_dict to name as missing
            weights = [state.pop(name) for name in names]
            target = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], dtype=dtype, device=weights[0].device)
            row = 0
            for w in weights:
                target[row:row + w.shape[0]].copy_(w)
                row += w.shape[0]
            out[f"{prefix}{fused}.weight"] = target
    out.update((k, v.to(dtype) if v.is_floating_point() else v) for k, v in state.items())
    return out


@torch.no_grad()
def live_state(model: Any) -> dict[str, torch.Tensor]:
    """The causal LM's weights under transformers' names, sharing storage with the policy; LoRA
    layers merged (their base weight plus each active adapter's delta)."""
    lm = causal_lm(model)
    state = {k.replace(".base_layer", ""): v for k, v in lm.state_dict().items() if ".lora_" not in k}
    for name, module in lm.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            merged = state[f"{name}.weight"]
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    merged = merged + module.get_delta_weight(adapter).to(merged.dtype)
            state[f"{name}.weight"] = merged
    return state


def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], seeds: Sequence[int], max_new_tokens: int,
             context_length: int, max_batch_size: int, temperature: float = 1.0, dtype: torch.dtype | None = None
             ) -> tuple[list[Answer], float, str]:
    """Sample one answer per prompt at the policy's current weights: (answers, seconds, engine)."""
    from ..core.batch import BatchEngine
    from ..core.generate import SamplingParams

    started = time.perf_counter()
    native = native_policy(model, dtype, batch_rows=min(max_batch_size, len(prompts)))
    runner_model = native if native is not None else causal_lm(model)
    was_training = runner_model.training
    runner_model.eval()
    try:
        engine = BatchEngine(runner_model, tokenizer, context_length, max_batch_size=max(1, min(max_batch_size, len(prompts))),
                             max_queue=len(prompts), prefix_cache_bytes=0)
        requests = [engine.submit(ids, SamplingParams(temperature=temperature, top_p=1.0, top_k=0,
                                                      max_new_tokens=max_new_tokens, seed=seed))
                    for ids, seed in zip(prompts, seeds)]
        while engine.step():
            pass
    finally:
        if was_training:
            runner_model.train()
    answers = []
    for request in requests:
        if request.stats.finish_reason == "error":
            raise request.exception or RuntimeError("rollout generation failed")
        ids = list(request.output_ids)
        if request.stop_token_id is not None:  # the policy learns to stop: the stop token is an action
            ids.append(request.stop_token_id)
        answers.append(Answer(ids, request.stats.finish_reason or "length"))
    return answers, time.perf_counter() - started, "native" if native is not None else "transformers"
