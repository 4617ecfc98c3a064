"""The typed config of a `vicuna judge` run: defaults < `--config file.yaml` < flags (core/config.py).

Every run option lives here once, validated here once; errors name the flag (`--concurrency`),
and a value from a file says so (`--concurrency (from judge.yaml): ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..core.choices import Device, Dtype
from ..core.config import CommandConfig
from . import ANSWERS, ARENA_JUDGMENTS, JUDGMENTS
from .client import DEFAULT_API_BASE, Sampling
from .judging import MODES
from .original import TEMPERATURE as ORIGINAL_TEMPERATURE
from .questions import DEFAULT_REF_MODEL

BENCH_HELP = "Built-in set name (vicuna80), a FastChat question.jsonl, or a FastChat bench dir (e.g. data/mt_bench)."
STRUCTURED = ("auto", "on", "off")


class JudgeConfig(CommandConfig):
    pair: Optional[tuple[str, str]] = Field(None, description="Judge MODEL_A against MODEL_B, both orders.")
    mode: Optional[str] = Field(None, description="single, pairwise-baseline, pairwise-all (--pair implies pair), or pairwise-scores (the original 2023 method: two scores in one review).")
    swap: bool = Field(False, description="pairwise-scores: also judge each pair in the other order (position bias).")
    baseline: Optional[str] = Field(None, description="The baseline model for --mode pairwise-baseline.")
    models: Optional[list[str]] = Field(None, description="Comma-separated models to judge (default: every answer file).")
    bench: Optional[str] = Field(None, description=BENCH_HELP)
    ref_model: str = Field(DEFAULT_REF_MODEL, description="A bench dir's reference_answer/<MODEL>.jsonl, used for math, reasoning and coding (an inline reference only where it has none).")
    answers: Path = Field(ANSWERS, description="Directory of model-answer files ({model}.jsonl).")
    output: Path = Field(JUDGMENTS, description="Directory for judgment files, the judge cache and the resolved config.yaml (with --battles: judge/arena_judgment).")
    judge_model: str = Field("gpt-4.1", description="The judge's model id.")
    judge_api_base: str = Field(DEFAULT_API_BASE, description="OpenAI-compatible endpoint of the judge [env: VICUNA_JUDGE_API_BASE].")
    judge_api_key_env: Optional[str] = Field(None, description="Env var holding the judge's key (default VICUNA_JUDGE_API_KEY, else OPENAI_API_KEY).")
    concurrency: int = Field(8, ge=1, description="Judge calls in flight at once.")
    max_calls: Optional[int] = Field(None, ge=0, description="Stop cleanly after this many judge calls (re-run to continue).")
    price: Optional[tuple[float, float]] = Field(None, description="USD per million tokens, INPUT,OUTPUT (e.g. 2,8), for --dry-run's cost.")
    est_output_tokens: int = Field(300, ge=0, description="Expected tokens per judge reply, for --dry-run.")
    allow_missing: bool = Field(False, description="Judge on the questions that have answers from every model.")
    # None: 0, or the original's 0.2 for pairwise-scores
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="Judge sampling temperature [default: 0; 0.2 for pairwise-scores, the original's].")
    max_tokens: int = Field(1024, ge=1, description="Longest judge reply.")
    timeout: float = Field(120.0, gt=0, description="Seconds per judge call before it is retried.")
    retries: int = Field(6, ge=0, description="Retries of a failed call (429, 5xx, timeouts).")
    parse_retries: int = Field(1, ge=0, description="Ask again this many times for an unreadable verdict.")
    explanation_chars: Optional[int] = Field(None, ge=16, description="Bound the verdict's explanation to N characters (the schema's maxLength; needs --structured, and an endpoint that enforces it: vicuna serve, vLLM): a small judge then finishes its verdict instead of looping.")
    structured: str = Field("auto", description="Send a JSON-schema response_format: auto (off once rejected), on, off.")
    battles: Optional[Path] = Field(None, description="Judge arena battles (FastChat's battle JSONL, `judge arena export`) and report the judge's agreement with the votes.")

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
        # the flag's comma-separated form (repeatable); a YAML list passes as is
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(m, str) for m in items):
            return [m.strip() for item in items for m in item.split(",") if m.strip()]
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
        if self.explanation_chars is not None and self.structured == "off":
            raise ValueError("--explanation-chars bounds the JSON schema's explanation: it needs --structured auto or on")
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


class AnswerConfig(CommandConfig):
    """`vicuna judge answer`: a question set answered by one model into FastChat's answer JSONL."""

    model: Optional[str] = Field(None, description="Local model (alias, dir, .gguf) or, with --api-base, the server's model id.")
    api_base: Optional[str] = Field(None, description="Answer through an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    api_key: Optional[str] = Field(None, description="Key for --api-base [env: OPENAI_API_KEY].")
    model_id: Optional[str] = Field(None, description="Name for the answers (file name); default: the model's name.")
    bench: Optional[str] = Field(None, description=BENCH_HELP)
    output: Path = Field(ANSWERS, description="Directory for {model_id}.jsonl.")
    max_new_tokens: int = Field(1024, ge=1, description="Longest answer per turn.")
    format: str = Field("fastchat", description="fastchat ({model_id}.jsonl) or 2023 (answer_{model_id}.jsonl with `text`, as fastchat/eval's tables).")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="Sampling temperature (default: per category, FastChat's).")
    concurrency: int = Field(4, ge=1, description="Questions in flight (API models; a local model answers one at a time).")
    first_n: Optional[int] = Field(None, ge=1, description="Only the first N questions.")
    template: Optional[str] = Field(None, description="Conversation template for a local model.")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1, mps (local model).")
    dtype: Dtype = Field("auto", description="auto, bfloat16 (bf16), float16 (fp16) or float32 (fp32) (local model).")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from .answers import FORMATS

        if value not in FORMATS:
            raise PydanticCustomError("choice", f"unknown {value!r}; known: {', '.join(sorted(FORMATS))}")
        return value

    @model_validator(mode="after")
    def _api_needs_model(self) -> "AnswerConfig":
        if self.api_base and not self.model:
            raise ValueError("--api-base needs -m MODEL (the server's model id)")
        return self
