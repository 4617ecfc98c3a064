"""The typed config of `vicuna apply-delta`, `make-delta` and `merge-lora` (defaults < --config
YAML < flags). Kept free of torch so `vicuna --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator, model_validator

from ..core.choices import Dtype
from ..core.config import CommandConfig
from ..core.errors import VicunaError


class DeltaConfig(CommandConfig):
    base: str = Field(description="Base model: model dir, alias or Hub id (e.g. the original LLaMA).")
    delta: Optional[str] = Field(None, description="Delta to add to the base: model dir or Hub id.")
    output: Path = Field(description="Directory to write (the target; with --make, the delta).")
    make: bool = Field(False, description="Make a delta instead: --target minus --base, written to -o.")
    target: Optional[str] = Field(None, description="With --make: the fine-tuned model.")
    lora: Optional[str] = Field(None, description="Merge this peft LoRA adapter (dir or Hub id) into --base instead.")
    dtype: Dtype = Field("auto", description=(
        "bfloat16 (bf16), float16 (fp16) or float32 (fp32); arithmetic is always fp32. auto: the dtype in the "
        "delta's config (make: the target's; merge: the base's)."))
    max_shard_size: str = Field("5GB", description="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
    check: Optional[str] = Field(None, description=(
        "Before publishing, compare with this expected model (dir or name) or sha256 file (sha256sum format or a "
        "vicuna manifest); a mismatch lists the tensors and leaves nothing behind."))
    overwrite: bool = Field(False, description="Replace -o if it exists (only once the new output is complete).")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        from .writer import parse_size

        parse_size(value)
        return value

    @model_validator(mode="after")
    def _one_operation(self) -> "DeltaConfig":
        # VicunaError passes through pydantic untouched, so these messages name the flags as written.
        if self.make and (self.target is None or self.delta or self.lora):
            raise VicunaError("--make computes a delta: it needs --base and --target, and no --delta or --lora",
                              hint="vicuna make-delta --base BASE --target FINE_TUNED -o DELTA")
        if self.lora and (self.delta or self.target):
            raise VicunaError("--lora merges an adapter into --base: drop --delta / --target")
        if not (self.make or self.lora or self.delta):
            raise VicunaError("give --delta DELTA to apply a delta, --lora ADAPTER to merge an adapter "
                              "(merge-lora), or --make --target TARGET to make a delta (make-delta)")
        if self.delta and self.target:
            raise VicunaError("--target is only for --make (make-delta); apply-delta adds --delta to --base")
        return self

    @property
    def operation(self) -> str:
        return "make-delta" if self.make else "merge-lora" if self.lora else "apply-delta"
