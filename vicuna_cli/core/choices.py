"""Enum-like option values with the spellings users type. One canonical name is printed and stored;
every command accepts the others (`--dtype bf16` and `--dtype bfloat16` are the same everywhere)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

DTYPE_SPELLINGS = {
    "auto": ("auto",),
    "bfloat16": ("bfloat16", "bf16", "torch.bfloat16"),
    "float16": ("float16", "fp16", "half", "torch.float16"),
    "float32": ("float32", "fp32", "float", "torch.float32"),
}
_DTYPE_BY_SPELLING = {spelling: name for name, spellings in DTYPE_SPELLINGS.items() for spelling in spellings}


def dtype_name(value: object) -> str:
    """The canonical dtype name for any common spelling; ValueError (listing them) otherwise."""
    name = _DTYPE_BY_SPELLING.get(str(value).strip().lower())
    if name is None:
        known = ", ".join(f"{canonical} ({'/'.join(s for s in spellings if s != canonical and '.' not in s)})"
                          if len(spellings) > 1 else canonical for canonical, spellings in DTYPE_SPELLINGS.items())
        raise ValueError(f"unknown dtype {value!r}; known: {known}")
    return name


# A config field of this type accepts every spelling and holds the canonical name.
Dtype = Annotated[Literal["auto", "bfloat16", "float16", "float32"], BeforeValidator(dtype_name)]


DEVICE_SPELLINGS = {
    "auto": ("auto",),
    "cpu": ("cpu",),
    "cuda": ("cuda", "gpu"),
    "mps": ("mps",),
}
_DEVICE_BY_SPELLING = {spelling: name for name, spellings in DEVICE_SPELLINGS.items() for spelling in spellings}


def device_name(value: object) -> str:
    """The canonical device for any common spelling (`cuda:1` keeps its index, `gpu:1` becomes
    `cuda:1`); ValueError listing the accepted spellings otherwise."""
    text = str(value).strip().lower()
    base, colon, index = text.partition(":")
    name = _DEVICE_BY_SPELLING.get(base)
    if name is None or (colon and (name != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {value!r}; known: auto, cpu, cuda (gpu), cuda:N, mps")
    return f"{name}:{int(index)}" if colon else name


# A config field of this type accepts every spelling and holds the canonical name.
Device = Annotated[str, BeforeValidator(device_name)]
# Training places one process per device (accelerate picks the index): no `cuda:N`, no mps.
TrainDevice = Annotated[Literal["auto", "cpu", "cuda"], BeforeValidator(device_name)]
