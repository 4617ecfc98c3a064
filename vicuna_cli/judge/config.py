"""The typed config of a `vicuna judge` run: defaults < `--config file.yaml` < flags (core/config.py).

Every run option lives here once, validated here once; errors name the flag (`--concurrency`),
and a value from a file says so (`--concurrency (from judge.yaml): ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..core.config import CommandConfig
from . import ANSWERS, ARENA_JUDGMENTS, JUDGMENTS
from .client import DEFAULT_API_BASE, Sampling
from .judging import MODES
from .original import TEMPERATURE as ORIGINAL_TEMPERATURE
from .questions import DEFAULT_REF_MODEL

STRUCTURED = ("auto", "on", "off")


class JudgeConfig(CommandConfig):
    pair: Optional[tuple[str, str]] = None
    mode: Optional[str] = None
    baseline: Optional[str] = None
    models: Optional[list[str]] = None
    bench: Optional[str] = None
    ref_model: str = DEFAULT_REF_MODEL
    answers: Path = ANSWERS
    output: Path = JUDGMENTS
    judge_model: str = "gpt-4.1"
    judge_api_base: str = DEFAULT_API_BASE
    judge_api_key_env: Optional[str] = None
    concurrency: int = Field(8, ge=1)
    max_calls: Optional[int] = Field(None, ge=0)
    price: Optional[tuple[float, float]] = None
    est_output_tokens: int = Field(300, ge=0)
    allow_missing: bool = False
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # None: 0, or the original's 0.2 for pairwise-scores
    swap: bool = False
    max_tokens: int = Field(1024, ge=1)
    timeout: float = Field(120.0, gt=0)
    retries: int = Field(6, ge=0)
    parse_retries: int = Field(1, ge=0)
    structured: str = "auto"
    battles: Optional[Path] = None  # arena battles (FastChat's battle JSONL) to judge instead of a bench

    @field_validator("mode", "structured")
    @classmethod
    def _known(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's Literal error does not repeat the value given; this says which value was wrong
        choices = MODES if info.field_name == "mode" else STRUCTURED
        if value is not None and value not in choices:
            raise PydanticCustomError("choice", f"unknown {value!r}; known: {', '.join(sorted(choices))}")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):  # the flag's comma-separated form; a YAML list passes as is
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("price", mode="before")
    @classmethod
    def _split_price(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                price_in, price_out = (float(x) for x in value.split(","))
                return price_in, price_out
            except ValueError:
                raise PydanticCustomError("price", f"expected INPUT,OUTPUT in USD per million tokens, e.g. 2,8, not {value!r}") from None
        return value

    @model_validator(mode="after")
    def _mode_fits(self) -> "JudgeConfig":
        if self.pair and self.mode not in (None, "pair", "pairwise-scores"):
            raise ValueError(f"--pair judges one pair; it does not go with --mode {self.mode}")
        if self.battles and (self.pair or self.mode or self.models or self.baseline or self.bench):
            raise ValueError("--battles judges the arena's battles, each its own pair: it does not go with --pair, --mode, --models, --baseline or --bench")
        if self.battles and "output" not in self.model_fields_set:
            self.output = ARENA_JUDGMENTS  # not into the bench's judgment files
        if self.swap and self.run_mode != "pairwise-scores":
            raise ValueError("--swap is for --mode pairwise-scores (the other pairwise modes always judge both orders)")
        return self

    @property
    def run_mode(self) -> str:
        if self.battles:
            return "pair"
        if self.mode == "pairwise-scores":
            return self.mode
        return "pair" if self.pair else (self.mode or "single")

    @property
    def sampling(self) -> Sampling:
        default = ORIGINAL_TEMPERATURE if self.run_mode == "pairwise-scores" else 0.0
        return Sampling(default if self.temperature is None else self.temperature, self.max_tokens)
