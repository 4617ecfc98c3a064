"""The typed configs of `vicuna data fetch|clean|stats|pairs|mix`: each option's default, help and
validation, declared once; the commands derive their flags from them. Kept light: `--help`
imports this module (the steps that use the configs import heavier things)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from ..core.config import CommandConfig
from ..core.hf import TRUST_REMOTE_CODE_HELP

FETCH_RETRIES = 3  # the Python function's default too (fetch.fetch)


class FetchConfig(CommandConfig):
    source: str = Field(description="hf://owner/name (a Hub dataset), an http(s):// URL, or a local file.")
    output: Path = Field(description="Directory to fetch into (manifest.yaml is written there).")
    file: Optional[str] = Field(None, description="hf:// only: the file's path in the dataset repo.")
    revision: Optional[str] = Field(None, description="hf:// only: branch, tag or commit.")
    sha256: Optional[str] = Field(None, description="Expected SHA-256; a file that differs is removed.")
    retries: int = Field(FETCH_RETRIES, ge=0, description="Resume an interrupted download this many times.")
    force: bool = Field(False, description="Fetch again even if the manifest says it is done.")


MODEL_HELP = "Model whose tokenizer and template count tokens (alias, dir, .gguf or Hub id)."
TEMPLATE_HELP = "Conversation template (default: the model's own, else vicuna_v1.1)."
INPUT_FORMAT_HELP = "auto, sharegpt, openai, alpaca, gpt4all or oasst1."
WORKERS_HELP = "Worker processes; 0 = one per CPU. The output does not depend on it."
FORMAT_HELP = "Output format json or jsonl (default: from -o's extension)."
InputFormat = Literal["auto", "sharegpt", "openai", "alpaca", "gpt4all", "oasst1"]


class CleanConfig(CommandConfig):
    inputs: list[str] = Field(min_length=1, description="Input files (- reads stdin).")
    output: Path = Field(description="Output file: *.json (array) or *.jsonl.")
    format: Optional[Literal["json", "jsonl"]] = Field(None, description=FORMAT_HELP)
    input_format: InputFormat = Field("auto", description=INPUT_FORMAT_HELP)
    oasst_paths: Literal["best", "all"] = Field("best", description="OASST1 trees: best (best-ranked reply at every turn) or all (every path).")
    overwrite: bool = Field(False, description="Replace an existing output.")
    strict: bool = Field(False, description="Fail on a record of the wrong shape instead of skipping it.")
    html: bool = Field(True, description="Convert exported HTML to Markdown.")
    empty: bool = Field(True, description="Remove empty or whitespace-only turns.")
    roles: bool = Field(True, description="Normalise roles (merge, drop leading answer / trailing question).")
    dedup: bool = Field(True, description="Drop repeated ids and repeated first exchanges.")
    split: bool = Field(True, description="With -m: split long conversations (else only count tokens).")
    min_turns: int = Field(1, ge=0, description="Drop conversations with fewer assistant turns.")
    min_chars: int = Field(16, ge=0, description="Drop conversations with fewer characters.")
    blocklist: list[Path] = Field([], description="File of phrases (one a line); conversations containing one are dropped.")
    blocklist_preset: Optional[str] = Field(None, description="'original': the list Vicuna's cleaning used (openai, chatgpt, rate-limit answers).")
    lang: Optional[str] = Field(None, description="Keep only these languages, e.g. en,ko (ISO 639-1).")
    model: Optional[str] = Field(None, description=MODEL_HELP)
    template: Optional[str] = Field(None, description=TEMPLATE_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)
    max_length: int = Field(2048, ge=8, description="With -m: most tokens per piece.")
    workers: int = Field(0, ge=0, description=WORKERS_HELP)
    report: Optional[Path] = Field(None, description="Also write the report as JSON here.")

    @field_validator("lang")
    @classmethod
    def _lang_codes(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        codes = [c.strip().lower() for c in value.split(",") if c.strip()]
        if not codes:
            raise ValueError("give language codes, e.g. --lang en,ko")
        return ",".join(codes)


class StatsConfig(CommandConfig):
    inputs: list[str] = Field(min_length=1, description="Input files (- reads stdin).")
    input_format: InputFormat = Field("auto", description=INPUT_FORMAT_HELP)
    model: Optional[str] = Field(None, description=MODEL_HELP)
    template: Optional[str] = Field(None, description=TEMPLATE_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)
    languages: bool = Field(True, description="Identify each conversation's language.")
    workers: int = Field(0, ge=0, description=WORKERS_HELP)


class PairsConfig(CommandConfig):
    inputs: list[str] = Field(min_length=1, description="Preference files (- reads stdin).")
    output: Path = Field(description="Output: pairwise JSONL {id, prompt, chosen, rejected, source, margin?}.")
    input_format: Literal["auto", "hh-rlhf", "shp", "oasst1", "pairs"] = Field("auto", description="auto, hh-rlhf, shp, oasst1 or pairs.")
    # The SHP paper trains on pairs whose preferred answer has at least twice the other's score.
    shp_min_ratio: float = Field(2.0, ge=1.0, description="SHP: keep pairs whose preferred answer's score is at least this multiple of the other's.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    strict: bool = Field(False, description="Fail on a record of the wrong shape instead of skipping it.")
    dedup: bool = Field(True, description="Drop pairs with the same prompt and answers.")
    report: Optional[Path] = Field(None, description="Also write the report as JSON here.")


class MixConfig(CommandConfig):
    sources: list[str] = Field(min_length=1, description="PATH:SHARE (e.g. oasst.json:0.5) or PATH:RECORDS (e.g. alpaca.json:1000).")
    output: Path = Field(description="Output file: *.json or *.jsonl.")
    seed: int = Field(42, description="Seed of the sampling and the output order.")
    total: Optional[int] = Field(None, ge=1, description="Records in the mix, with shares (default: all distinct records of the sources).")
    kind: Literal["auto", "conversations", "pairs"] = Field("auto", description="auto (from the first source), conversations or pairs.")
    format: Optional[Literal["json", "jsonl"]] = Field(None, description=FORMAT_HELP)
    overwrite: bool = Field(False, description="Replace an existing output.")
    report: Optional[Path] = Field(None, description="Also write the per-source figures as JSON here.")
