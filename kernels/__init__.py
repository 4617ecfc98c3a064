"""Fused and memory-lean ops for vicuna, importable as `vicuna_kernels`.

(Not as `kernels`: transformers probes for the Hugging Face package of that name.)

Each op has a pure-PyTorch implementation that runs everywhere and is the reference its tests
compare against; GPU variants (Triton) sit behind the same function and are picked on CUDA.
"""

from .cross_entropy import linear_cross_entropy, reference_linear_cross_entropy

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy"]
