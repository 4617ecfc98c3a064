"""The typed config of `vicuna data fetch` (the other data commands' configs live with their
steps: pipeline.py, stats.py, preferences.py, mix.py). Kept light: `--help` imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field

from ..core.config import CommandConfig

FETCH_RETRIES = 3  # the Python function's default too (fetch.fetch)


class FetchConfig(CommandConfig):
    source: str = Field(description="hf://owner/name (a Hub dataset), an http(s):// URL, or a local file.")
    output: Path = Field(description="Directory to fetch into (manifest.yaml is written there).")
    file: Optional[str] = Field(None, description="hf:// only: the file's path in the dataset repo.")
    revision: Optional[str] = Field(None, description="hf:// only: branch, tag or commit.")
    sha256: Optional[str] = Field(None, description="Expected SHA-256; a file that differs is removed.")
    retries: int = Field(FETCH_RETRIES, ge=0, description="Resume an interrupted download this many times.")
    force: bool = Field(False, description="Fetch again even if the manifest says it is done.")
