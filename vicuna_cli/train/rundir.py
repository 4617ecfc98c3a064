"""The run directory: its guard against clobbering another run, config.yaml (resolved, with
versions), metrics.jsonl, and the progress display (a rich bar on a TTY, and one greppable line
per log interval on stderr either way)."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..core import console
from ..core.errors import VicunaError
from ..core.store import atomic_write_text
from .config import DATA_POSITION_FIELDS, TrainConfig

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RUN_FILES = (CONFIG, METRICS, "checkpoints", "dpo_reference")  # the last: train dpo
VERSIONED = ("vicuna-cli", "torch", "transformers", "accelerate", "peft", "tokenizers", "flash-attn", "deepspeed")


def prepare(run_dir: Path, config: TrainConfig, delete: bool = True) -> bool:
    """Check the output dir; returns True when an earlier run there is being resumed. With
    --overwrite the old run is removed (by the process with `delete`, the main one)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise VicunaError(f"output {run_dir} exists and is not a directory", hint="choose another -o")
    entries = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    is_run = any(name in entries for name in RUN_FILES)
    if not entries:
        return False
    if not is_run:
        raise VicunaError(f"output dir {run_dir} is not empty and holds no vicuna run", hint="choose another -o")
    if config.resume:
        check_same_data(run_dir, config)
        return True
    if config.overwrite:
        for name in entries if delete else []:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return False
    raise VicunaError(
        f"output dir {run_dir} holds another run",
        hint="continue it with --resume auto, replace it with --overwrite, or choose another -o",
    )


def check_same_data(run_dir: Path, config: TrainConfig) -> None:
    """A resumed run must see the same steps: refuse changes to what fixes the data position."""
    path = run_dir / CONFIG
    if not path.is_file():
        return
    before = (yaml.safe_load(path.read_text()) or {}).get("train", {})
    now = config.model_dump(mode="json")
    fields = getattr(config, "position_fields", DATA_POSITION_FIELDS)  # a method's own (PPO: prompts, rollout batch)
    changed = [k for k in fields if k in before and before[k] != now.get(k)]
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} (was {before[k]}, now {now.get(k)})" for k in changed)
        raise VicunaError(
            f"--resume: the run in {run_dir} used other data options: {what}",
            hint="resume with the options of the original run (see its config.yaml), or start a new run",
        )


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_config(run_dir: Path, config: TrainConfig, resolved: dict[str, Any]) -> None:
    document = {"train": config.model_dump(mode="json"), "resolved": resolved, "versions": versions()}
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(document, sort_keys=False))


class Metrics:
    """Appends one JSON object per line (main process only). On resume, lines past the
    checkpoint's step are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resumed_step: int | None, enabled: bool):
        self.path = run_dir / METRICS
        self.enabled = enabled
        if enabled and resumed_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class Progress:
    """A rich progress bar when stderr is a terminal; always one plain line per interval."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self._bar = None
        if enabled and console.err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"), console=console.err, transient=True)
            self._task = self._bar.add_task("train", total=total, completed=start, status="")
            self._bar.start()

    def update(self, step: int, status: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def log_line(record: dict[str, Any]) -> str:
    """`step 12/300 | loss 1.2345 | lr 2.00e-05 | ...`: one greppable line per interval."""
    parts = [f"step {record['step']}/{record['total_steps']}", f"epoch {record['epoch']}",
             f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts += [f"tokens/s {record['tokens_per_s']:.0f}", f"supervised {record['supervised_tokens']}",
              f"elapsed {time.strftime('%H:%M:%S', time.gmtime(record['elapsed_s']))}"]
    return " | ".join(parts)
