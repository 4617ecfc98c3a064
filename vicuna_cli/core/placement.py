"""Where and how a model runs: device, dtype, attention kernel and implementation (native or
transformers), each picked from the machine and the user's choice with one clear error.

Split from models.py (resolving and loading); torch is imported inside functions so that
`vicuna --help` stays instant.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .choices import dtype_name
from .errors import VicunaError, unknown_choice
from .hf import has_remote_code


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise VicunaError(f"unknown device {device!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    mps = getattr(torch.backends, "mps", None)
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not (mps and mps.is_available())):
        raise VicunaError(f"--device {device}: this machine's torch cannot use it",
                          hint="use --device cpu (or auto), or install a torch build for that device")
    return device


def pick_dtype(device: str, dtype: str = "auto") -> str:
    import torch

    try:
        dtype = dtype_name(dtype)
    except ValueError as exc:
        raise VicunaError(str(exc), hint="--dtype takes auto, bfloat16, float16 or float32 (or bf16, fp16, fp32)") from None
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # With native bf16 instructions (AVX512-BF16/AMX) bf16 decoded ~1.3x faster than fp32 (AMD EPYC,
    # BENCHMARKS.md). oneDNN also reports bf16 "supported" on plain AVX-512, where it is emulated:
    # on such a Xeon bf16 prefill took 1.9-2.0 s against 1.1 s in fp32, so ask the CPU itself.
    native = cpu_has_native_bf16()
    if native is None:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "bfloat16" if native else "float32"


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True/False from the CPU flags on Linux; None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_attention(device: str) -> str:
    """flash-attn 2 on CUDA when installed, else PyTorch SDPA (fused kernels on CPU and GPU)."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


IMPLEMENTATIONS = ("auto", "native", "transformers")


def pick_implementation(path: Path, device: str, requested: str = "auto", trust_remote_code: bool = False) -> tuple[str, str]:
    """(implementation, why). `auto` takes the native Llama path on CPU when the checkpoint fits
    it (it starts ~2.5 s sooner), else transformers (any architecture; flash-attn 2 on CUDA).
    A model whose own code the user allowed runs that code, which only transformers can do."""
    from .native_llama import read_config, unsupported_reason

    if requested not in IMPLEMENTATIONS:
        raise unknown_choice("implementation", requested, list(IMPLEMENTATIONS))
    if requested == "transformers":
        return "transformers", "requested"
    reason = unsupported_reason(read_config(path))
    if reason is None and trust_remote_code and has_remote_code(path):
        reason = "the model's own code (--trust-remote-code)"
    if reason is None and not (path / "tokenizer.json").is_file():
        reason = "no tokenizer.json"
    if reason is None and not any(path.glob("*.safetensors")):
        reason = "weights are not safetensors"
    if requested == "native":
        if reason:
            raise VicunaError(f"the native implementation cannot load {path}: {reason}", hint="use --implementation transformers")
        return "native", "requested"
    if device != "cpu":
        return "transformers", f"device {device}"
    return ("transformers", reason) if reason else ("native", "llama checkpoint on CPU")
