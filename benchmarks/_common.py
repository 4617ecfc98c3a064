"""Shared helpers for the benchmark scripts: machine description, statistics, tables, results.

Kept free of torch imports so the cold-start benchmark's parent process stays light.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "python": platform.python_version(),
        "torch": _pkg_version("torch"),
        "transformers": _pkg_version("transformers"),
        "vicuna-cli": _pkg_version("vicuna-cli"),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
    }


def print_machine(info: dict[str, Any]) -> None:
    print(f"date: {info['date']}")
    print(
        f"machine: {info['nproc']} CPU(s) · {info['cpu']} (bf16: {'yes' if info['cpu_bf16'] else 'no'}) · "
        f"{info['platform']}"
    )
    print(
        f"software: python {info['python']} · torch {info['torch']} · transformers {info['transformers']} · "
        f"vicuna-cli {info['vicuna-cli']}"
    )
    print(f"load average (1/5/15 min) at start: {info['loadavg_at_start']}")
    sys.stdout.flush()


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], path: str | None) -> Path:
    """Write JSON to `path`, or to benchmarks/results/<name>-<timestamp>.json (gitignored)."""
    if path:
        target = Path(path)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = RESULTS_DIR / f"{name}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target
