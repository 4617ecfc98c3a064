"""Fused and memory-lean ops for vicuna, importable as `vicuna_kernels`.

(Not as `kernels`: transformers probes for the Hugging Face package of that name.)

- `linear_cross_entropy`: the chunked fused LM-head + cross-entropy, pure PyTorch, any device;
  the training loop calls it directly.
- `rms_norm`, `swiglu`, `rope` (module `triton_ops`, imported on first use because it imports
  triton): Triton kernels, forward and backward, each beside its pure-PyTorch `*_reference`.
- `apply_kernels(model, mode)` / `kernel_plan(model, mode)`: the one switch that puts the Triton
  ops into a Hugging Face Llama-family model (on CUDA, or on CPU under TRITON_INTERPRET=1).
"""

_handed_over = False
if __name__ == "kernels":
    # Imported by the name `kernels`: a bare `import kernels` found this folder of a checkout first
    # (`python -m ...` run from the repository's root puts it on sys.path), shadowing the Hugging Face
    # package of that name, which transformers >= 5.25 requires and imports. Hand the name over to
    # that package when it is installed; vicuna itself always imports this folder as `vicuna_kernels`.
    # Without it, this folder loads as before (transformers < 5.25 imports it to read a version).
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _PathFinder.find_spec("kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout])
    if _spec is not None:
        _module = _module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds at the end
        _spec.loader.exec_module(_module)
        _handed_over = True
if not _handed_over:
    from .apply import MODES, OPS, KernelPlan, apply_kernels, kernel_plan, remove_kernels
    from .cross_entropy import (
        IGNORE_INDEX,
        default_chunk_size,
        linear_cross_entropy,
        reference_linear_cross_entropy,
    )

    _TRITON_EXPORTS = (
        "rms_norm",
        "swiglu",
        "rope",
        "rms_norm_reference",
        "swiglu_reference",
        "rope_reference",
    )

    __all__ = [
        "IGNORE_INDEX",
        "MODES",
        "OPS",
        "KernelPlan",
        "apply_kernels",
        "default_chunk_size",
        "kernel_plan",
        "linear_cross_entropy",
        "reference_linear_cross_entropy",
        "remove_kernels",
        *_TRITON_EXPORTS,
    ]


    def __getattr__(name: str):
        if name in _TRITON_EXPORTS:
            from . import triton_ops

            return getattr(triton_ops, name)
        raise AttributeError(f"module 'vicuna_kernels' has no attribute {name!r}")
