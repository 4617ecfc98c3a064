"""The one typed config of `vicuna train sft` (defaults < --config recipe.yaml < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..core.choices import Dtype
from ..core.config import CommandConfig
from ..core.threads import Threads

# Vicuna's recipe (FastChat README): global batch 128, lr 2e-5, 3 epochs, max length 2048,
# weight decay 0, warmup 0.03, cosine schedule.
DEFAULT_GLOBAL_BATCH = 128


class TrainConfig(CommandConfig):
    model: str = "smollm2-135m-instruct"
    trust_remote_code: bool = False  # the base model folder's own Python code runs only when True
    data: list[str] = Field(default_factory=list)
    output: Path | None = None
    template: str | None = None  # None: the tokenizer's chat template, else vicuna_v1.1
    max_length: int = Field(2048, gt=1)
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    eval_data: list[str] = Field(default_factory=list)
    eval_every: int = Field(0, ge=0)  # steps; 0 = only at the end (when there is eval data)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 42
    log_every: int = Field(10, ge=1)

    learning_rate: float = Field(2e-5, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 turns clipping off

    global_batch_size: int | None = Field(None, ge=1)  # sequences per optimizer step
    global_batch_tokens: int | None = Field(None, ge=1)  # or tokens per optimizer step
    micro_batch_size: int = Field(1, ge=1)  # sequences per forward pass (--no-packing)
    micro_batch_tokens: int | None = Field(None, ge=1)  # packed row capacity; default max-length
    packing: bool = True

    gradient_checkpointing: bool = False
    precision: Dtype = "auto"  # any spelling; bfloat16/float16 are mixed precision, float32 none
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    kernels: Literal["auto", "off"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Threads = None

    lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target: list[str] = Field(default_factory=lambda: ["all-linear"])
    qlora: bool = False
    merge: bool = False

    save_every: int = Field(0, ge=0)  # steps; 0 = off
    save_every_minutes: float = Field(0.0, ge=0.0)
    keep_checkpoints: int = Field(3, ge=1)
    resume: str | None = None  # "auto" or a checkpoint dir
    overwrite: bool = False
    report_to: list[str] = Field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...
    run_name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.global_batch_size is not None and self.global_batch_tokens is not None:
            raise ValueError("give --global-batch-size (sequences) or --global-batch-tokens, not both")
        if self.eval_split and self.eval_data:
            raise ValueError("give --eval-split or --eval-data, not both")
        if self.qlora:
            self.lora = True
        if self.merge and not self.lora:
            raise ValueError("--merge merges a LoRA adapter: it needs --lora")
        if self.global_batch_tokens is not None and self.global_batch_tokens < self.max_length:
            raise ValueError(
                f"--global-batch-tokens {self.global_batch_tokens} is smaller than --max-length {self.max_length}"
            )
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.max_length:
            raise ValueError(f"--micro-batch-tokens {self.micro_batch_tokens} is smaller than --max-length "
                             f"{self.max_length}: the longest sample must fit in one packed row")
        return self

    @property
    def row_capacity(self) -> int:
        return self.micro_batch_tokens or self.max_length

    def batch_size(self) -> int | None:
        """Sequences per step (None when the batch is counted in tokens)."""
        if self.global_batch_tokens is not None:
            return None
        return self.global_batch_size or DEFAULT_GLOBAL_BATCH


# What fixes which samples make up each optimizer step: a resumed run must not change these.
DATA_POSITION_FIELDS = (
    "model", "data", "template", "max_length", "eval_split", "eval_data", "seed",
    "global_batch_size", "global_batch_tokens", "packing", "micro_batch_tokens", "micro_batch_size",
    "share_prompt",  # train rm: a pair's packed length
)
