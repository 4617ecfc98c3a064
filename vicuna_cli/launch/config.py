"""The one typed config of `vicuna launch` (defaults < --config file.yaml < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..core.config import CommandConfig

Kind = Literal["auto", "job", "service", "cluster"]


class LaunchConfig(CommandConfig):
    recipe: Path
    env: list[str] = Field(default_factory=list)  # KEY=VALUE, or KEY to take $KEY from this shell
    dry_run: bool = False
    local: bool = False
    down: bool = False  # a cluster recipe: tear the cluster down when its job ends
    name: str | None = None  # job / service / cluster name (default: the recipe's `name`)
    kind: Kind = "auto"  # auto: service if `service:`, job if `job_recovery`, else cluster
    hours: float | None = Field(None, gt=0)  # the cost estimate's duration (default: the recipe header's)
    local_dir: Path | None = None  # --local work dir (default: a new temp dir, removed on success)
    stop_timeout: float = Field(120.0, gt=0)  # --local Ctrl-C: seconds the run gets to save and stop


class ManageConfig(CommandConfig):
    """`vicuna launch status|logs|down`."""

    action: Literal["status", "logs", "down"]
    name: str | None = None
    kind: Literal["job", "service", "cluster"] = "job"
    follow: bool = True
