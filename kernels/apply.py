"""The one switch: put the Triton ops into a Hugging Face Llama-family model, or take them out.

`kernel_plan(model, mode)` says what would be used and why (a loggable line via `describe()`);
`apply_kernels(model, mode)` does it and returns the ops applied. Patching is per model instance:

- RMSNorm modules and SwiGLU MLPs get an instance `forward` that calls the Triton op;
- attention modules get an instance `forward` that marks "this model uses Triton RoPE" while the
  original forward runs; the modeling module's `apply_rotary_pos_emb` is replaced once by a
  dispatcher that uses Triton only under that mark, so other models in the process are untouched.

A module qualifies only if its code is Llama's own: the class's `forward` (and the modeling
module's `apply_rotary_pos_emb`) must have the same bytecode and names as transformers' Llama
implementation, which the Llama-derived families (Mistral, Qwen2/3, SmolLM3, Granite, ...) copy
verbatim. Variants with other arithmetic (Gemma's `1 + weight` norm, gelu MLPs, partial rotary)
do not match and keep their own code.
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
import os
import sys
import types
from dataclasses import dataclass, field

import torch

MODES = ("auto", "off")
OPS = ("rms_norm", "swiglu", "rope")

_ROPE_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("vicuna_kernels_rope", default=False)
_PATCH_MARK = "_vicuna_kernel"


@dataclass(frozen=True)
class KernelPlan:
    mode: str
    ops: tuple[str, ...]
    reason: str
    # The fused linear cross-entropy runs on any device; the training loop calls it directly.
    fused_loss: bool
    modules: dict[str, int] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        loss = "fused linear+cross-entropy loss" if self.fused_loss else "plain loss"
        if self.ops:
            counts = ", ".join(f"{op} ×{self.modules.get(op, 0)}" for op in self.ops)
            return f"kernels {self.mode}: Triton {counts} ({self.reason}); {loss}"
        return f"kernels {self.mode}: no Triton ops ({self.reason}); {loss}"


def _function(fn):
    """The plain function behind `fn`: through functools wrappers and, with the Hugging Face
    `kernels` package installed (transformers >= 5.25 requires it), through the `Func` module it
    wraps hub-kernelizable functions such as `apply_rotary_pos_emb` in, whose forward calls the
    original from its closure."""
    fn = inspect.unwrap(fn)
    if not hasattr(fn, "__code__") and isinstance(fn, torch.nn.Module):
        inner = [c.cell_contents for c in (getattr(type(fn).forward, "__closure__", None) or ())
                 if inspect.isfunction(c.cell_contents)]
        if len(inner) == 1:
            return inspect.unwrap(inner[0])
    return fn


def _signature(fn) -> tuple[bytes, tuple[str, ...]]:
    code = _function(fn).__code__
    return code.co_code, code.co_names


def _llama():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (SiLUActivation, torch.nn.SiLU))


def _targets(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The modules of `model` whose code is Llama's, per op."""
    llama = _llama()
    norm_sig = _signature(llama.LlamaRMSNorm.forward)
    mlp_sig = _signature(llama.LlamaMLP.forward)
    rope_sig = _signature(_ORIGINAL_ROPE.get(llama.__name__, llama.apply_rotary_pos_emb))
    found: dict[str, list[torch.nn.Module]] = {op: [] for op in OPS}
    for module in model.modules():
        cls = type(module)
        forward = getattr(cls, "forward", None)
        if forward is None or not hasattr(inspect.unwrap(forward), "__code__"):
            continue
        sig = _signature(forward)
        if sig == norm_sig:
            found["rms_norm"].append(module)
        elif sig == mlp_sig and _is_silu(getattr(module, "act_fn", None)):
            found["swiglu"].append(module)
        elif "apply_rotary_pos_emb" in sig[1]:
            home = sys.modules.get(cls.__module__)
            apply_fn = _ORIGINAL_ROPE.get(cls.__module__) or getattr(home, "apply_rotary_pos_emb", None)
            if apply_fn is not None and _signature(apply_fn) == rope_sig:
                found["rope"].append(module)
    return {op: mods for op, mods in found.items() if mods}


def _triton_status(device: torch.device) -> tuple[object | None, str]:
    """(the triton_ops module or None, why not / how it runs)."""
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpret_env:
        return None, f"the model is on {device.type}; the Triton kernels run on CUDA (or on CPU under TRITON_INTERPRET=1)"
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install 'vicuna-cli[gpu]')"
    try:
        from . import triton_ops
    except Exception as exc:  # a broken triton install must not stop training: fall back, say why
        return None, f"triton failed to import: {type(exc).__name__}: {exc}"
    import triton

    if device.type == "cuda":
        if triton_ops.INTERPRETED:
            return None, "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors, not CUDA"
        return triton_ops, f"Triton {triton.__version__} on {device}"
    if not triton_ops.INTERPRETED:
        return None, "TRITON_INTERPRET=1 was set after triton was imported (set it before starting Python)"
    return triton_ops, f"Triton {triton.__version__} interpreter on {device.type} (TRITON_INTERPRET=1)"


def kernel_plan(model: torch.nn.Module, mode: str = "auto") -> KernelPlan:
    """What `apply_kernels(model, mode)` would use, and why."""
    if mode not in MODES:
        from vicuna_cli.core.errors import unknown_choice

        raise unknown_choice("kernels mode", mode, list(MODES), hint="--kernels auto uses Triton on CUDA; off uses none")
    if mode == "off":
        return KernelPlan(mode, (), "--kernels off", fused_loss=False)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ops_module, why = _triton_status(device)
    if ops_module is None:
        return KernelPlan(mode, (), why, fused_loss=True)
    targets = _targets(model)
    if not targets:
        return KernelPlan(
            mode, (), f"{type(model).__name__} has no Llama-style RMSNorm, SiLU MLP or rotary attention", fused_loss=True
        )
    ops = tuple(op for op in OPS if op in targets)
    return KernelPlan(mode, ops, why, fused_loss=True, modules={op: len(targets[op]) for op in ops})


# ---------------------------------------------------------------------------------------------
# patching

_ORIGINAL_ROPE: dict[str, object] = {}  # modeling module name -> its own apply_rotary_pos_emb


def _install_rope_dispatcher(module_name: str) -> None:
    home = sys.modules[module_name]
    if module_name in _ORIGINAL_ROPE:
        return
    original = home.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _ROPE_ACTIVE.get() and not (cos.requires_grad or sin.requires_grad):
            from . import triton_ops  # looked up per call: the module may be re-imported (tests)

            return triton_ops.rope(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped_original__ = original
    _ORIGINAL_ROPE[module_name] = original
    home.apply_rotary_pos_emb = apply_rotary_pos_emb


def _rms_norm_forward(op):
    def forward(self, hidden_states):
        return op(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _swiglu_forward(op):
    def forward(self, x):
        return self.down_proj(op(self.gate_proj(x), self.up_proj(x)))

    return forward


def _rope_marking_forward(cls_forward):
    def forward(self, *args, **kwargs):
        token = _ROPE_ACTIVE.set(True)
        try:
            return cls_forward(self, *args, **kwargs)
        finally:
            _ROPE_ACTIVE.reset(token)

    return forward


def remove_kernels(model: torch.nn.Module) -> int:
    """Undo `apply_kernels` on this model; returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if _PATCH_MARK in module.__dict__:
            del module.forward
            del module.__dict__[_PATCH_MARK]
            restored += 1
    return restored


def apply_kernels(model: torch.nn.Module, mode: str = "auto") -> list[str]:
    """Patch `model` (a HF Llama-family model) to use the Triton ops `kernel_plan` picks.

    Returns the ops applied: [] for mode "off" (which also undoes an earlier apply), on CPU
    without the interpreter, without triton, or for a model with no Llama-style modules; call
    `kernel_plan(model, mode).describe()` for the reason. Applying twice is harmless.
    """
    plan = kernel_plan(model, mode)
    remove_kernels(model)
    if not plan.ops:
        return []
    from . import triton_ops

    targets = _targets(model)
    for op in plan.ops:
        for module in targets[op]:
            cls = type(module)
            if op == "rms_norm":
                forward = _rms_norm_forward(triton_ops.rms_norm)
            elif op == "swiglu":
                forward = _swiglu_forward(triton_ops.swiglu)
            else:
                _install_rope_dispatcher(cls.__module__)
                forward = _rope_marking_forward(cls.forward)
            module.forward = types.MethodType(forward, module)
            module.__dict__[_PATCH_MARK] = op
    return list(plan.ops)
