"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for the per-output-channel int8 weights.

Why: round-to-nearest int8 (each weight to its nearest step, quantize.quantize_int8) missed
the quality gate's top-1 agreement (96.2 % on distinct contexts, goal 97 %), with no single
projection to blame. GPTQ rounds a weight's columns one at a time and moves each column's
rounding error onto the columns not yet rounded, weighted by how the layer's real inputs
correlate (H = X^T X): the output error on those inputs shrinks, for the same int8 format and
the same per-row bf16 scales, so both kernels (int8 decode, dequantized bf16 prefill) and their
speed are unchanged.

Inputs X come from the built-in chats of core/calibration.py rendered with the model's own
template, run layer by layer through the model in fp32 where every earlier projection already
holds its int8 values ("sequential": each layer is calibrated on what it will really see).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import VicunaError

BLOCK = 128  # columns rounded per lazy batch (the paper's); the result does not depend on it
DAMP = 0.01  # of the mean of diag(H), added to it: H of a few thousand tokens is near singular
MAX_TOKENS = 96  # per chat: all of each short chat, so the cost stays bounded for long ones


def calibration_ids(model_dir: Path) -> list[list[int]]:
    """The built-in chats as token ids, rendered with the model's template (as chat sends them),
    or with the built-in default where that template cannot render (a chat template the sandbox
    blocks: the user then chats with --template, and the weights must still be made)."""
    from .calibration import CHATS
    from .templates import DEFAULT_TEMPLATE, template_for_model
    from .tokenizer import FastTokenizer

    tokenizer = FastTokenizer(Path(model_dir))

    def render(template: Any) -> list[list[int]]:
        out = []
        for user, assistant in CHATS:
            text = template.prompt_text([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                        add_generation_prompt=False)
            out.append(list(tokenizer(text, add_special_tokens=template.name != "auto")["input_ids"])[:MAX_TOKENS])
        return out

    try:
        return render(template_for_model(tokenizer))
    except VicunaError:
        return render(template_for_model(tokenizer, DEFAULT_TEMPLATE))


def gptq_int8(weight: Any, hessian: Any, scale: Any) -> Any:
    """int8 [out, in] of `weight` [out, in] against the fixed per-row `scale` [out] (bf16), GPTQ
    with `hessian` = sum of x x^T over the layer's inputs [in, in]. Columns go in order of
    decreasing diag(H) ("act order": the most used inputs are rounded while the most columns are
    left to absorb their error); the result is put back in the original column order."""
    import torch

    w = weight.float().clone()
    h = hessian.float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never non-zero: nothing to preserve
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += DAMP * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = _inverse_cholesky(h)
    # Transposed: a column of w is then a contiguous row, and one column's step is a few ops on
    # it plus one rank-1 update of the block (the per-column loop is most of GPTQ's time here).
    wt, s = w.T.contiguous(), scale.float()
    inv = 1 / s
    q = torch.empty_like(wt)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        block, hb = wt[i1:i2], hinv[i1:i2, i1:i2]  # block is a view: updated in place
        errors = torch.empty_like(block)
        for i in range(i2 - i1):
            rounded = torch.round(block[i] * inv).clamp_(-127, 127)
            q[i1 + i] = rounded
            error = errors[i]
            torch.sub(block[i], rounded * s, out=error).div_(hb[i, i])
            block[i + 1 :].addr_(hb[i, i + 1 :], error, alpha=-1)
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, errors, alpha=-1)
    out = torch.empty_like(q)
    out[order] = q
    return out.T.to(torch.int8).contiguous()


def _inverse_cholesky(h: Any) -> Any:
    """The upper Cholesky factor of H^-1 (row i: how column i's error moves the later columns).
    In fp32 (1.8x faster than fp64 for a 1536-wide H here); in fp64 where fp32 rounding leaves the
    damped H not positive definite."""
    import torch

    def factor(m: Any) -> Any:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True).float()

    try:
        return factor(h.float())
    except torch.linalg.LinAlgError:
        return factor(h.double())


def _inputs_of(module: Any, run: Callable[[], Any]) -> list[Any]:
    """What `module` is called with while `run()` runs (its first argument, one per call).
    Caught by wrapping the instance's `forward`, not with a forward pre-hook: the native model
    calls its modules' `forward()` directly (native_llama: no hook machinery in the hot path)."""
    seen: list[Any] = []
    original = module.forward

    def capture(x: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(x)
        return original(x, *args, **kwargs)

    module.forward = capture  # an instance attribute: found before the class's method
    try:
        run()
    finally:
        del module.forward
    return seen


def quantize_model(model_dir: Path, state: dict[str, Any], names: list[str],
                   scales_of: Callable[..., tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """{name: (q int8, scale bf16)} for the projections `names` of the (fused) checkpoint `state`
    (and the LM head, `lm_head.weight`, when named):
    per-row scales from `scales_of(weight, importance)` (the clipped least-squares ones of
    round-to-nearest, each input column weighted by its mean square in the calibration chats),
    int8 values from GPTQ on the inputs each projection sees in those chats.

    The model runs in bf16 as it will when chatting (the inputs GPTQ preserves are those), one
    layer at a time over all chats, and inside a layer one projection at a time in the order of
    the forward: each projection's inputs come through the int8 values of every projection before
    it (earlier layers and earlier in this layer), so GPTQ also makes up for their rounding."""
    import torch

    from .native_llama import NativeLlamaForCausalLM, read_config

    dtype = torch.bfloat16
    model = NativeLlamaForCausalLM(read_config(Path(model_dir)))
    weights = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.shape.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model.load_state_dict(weights, strict=False, assign=True)
    if model.shape.tie_word_embeddings:  # assign=True replaced the embedding the head was tied to
        model.lm_head.weight = model.model.embed_tokens.weight
    out: dict[str, tuple[Any, Any]] = {}

    def quantize(name: str, module: Any, inputs: list[Any], tokens: int) -> None:
        if name not in names:
            return
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).float()
        h = x.T @ x
        _, scale = scales_of(module.weight, torch.diag(h) / tokens)
        q = gptq_int8(module.weight, h, scale)
        out[name] = (q, scale)
        module.weight = torch.nn.Parameter((q.float() * scale.float()[:, None]).to(dtype), requires_grad=False)

    # One thread: GPTQ's column loop and the scale search are many small ops, where OpenMP's
    # threads mostly wait for each other: with 2 threads (and one busy neighbour) the build took
    # 97 s here against 25 s with one; the count in force is put back afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(model, model_dir, quantize)
    finally:
        torch.set_num_threads(threads)
    missing = set(names) - set(out)
    if missing:
        raise ValueError(f"GPTQ found no module for {sorted(missing)[:3]}")
    return out


def _run(model: Any, model_dir: Path, quantize: Callable[..., None]) -> None:
    """quantize_model's pass: every layer over all chats, one projection at a time."""
    import torch

    from .quantize import HEAD

    dtype = torch.bfloat16
    with torch.inference_mode():
        hidden = [model.model.embed_tokens(torch.tensor([ids])) for ids in calibration_ids(model_dir)]
        tokens = sum(x.shape[1] for x in hidden)
        ropes = [model._rope(torch.arange(x.shape[1]), dtype) for x in hidden]
        for index, layer in enumerate(model.model.layers):
            p, attn, mlp = f"model.layers.{index}.", layer.self_attn, layer.mlp
            # DecoderLayer.forward, one projection at a time over all chats.
            normed = [layer.input_layernorm(x) for x in hidden]
            quantize(p + "self_attn.qkv_proj.weight", attn.qkv_proj, normed, tokens)
            mixed = _inputs_of(attn.o_proj, lambda: [attn(n, c, s, None, index, 0) for n, (c, s) in zip(normed, ropes)])
            quantize(p + "self_attn.o_proj.weight", attn.o_proj, mixed, tokens)
            hidden = [x + attn.o_proj(m) for x, m in zip(hidden, mixed)]
            normed = [layer.post_attention_layernorm(x) for x in hidden]
            quantize(p + "mlp.gate_up_proj.weight", mlp.gate_up_proj, normed, tokens)
            acts = _inputs_of(mlp.down_proj, lambda: [mlp(n) for n in normed])
            quantize(p + "mlp.down_proj.weight", mlp.down_proj, acts, tokens)
            hidden = [x + mlp.down_proj(a) for x, a in zip(hidden, acts)]
        # The LM head last, on the final norm of what the int8 layers made (quantize.HEAD).
        quantize(HEAD, model.lm_head, [model.model.norm(x) for x in hidden], tokens)
