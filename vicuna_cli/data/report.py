"""What a data run did: per-step counts, a length histogram, languages; and progress on stderr."""

from __future__ import annotations

import json
import statistics
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from ..core import console
from ..core.store import atomic_write_text, human_size
from .steps import STEPS, Result

STEP_HELP = {
    "read": "records read; wrong-shape records skipped",
    "html": "exported HTML converted to Markdown",
    "empty": "empty or whitespace-only turns removed",
    "roles": "user/assistant alternation, system turn kept",
    "length": "too few answers or characters",
    "blocklist": "blocked phrases",
    "lang": "language filter",
    "dedup": "duplicate ids and first exchanges",
    "split": "pieces that fit --max-length tokens",
    "identical": "pairs whose chosen and rejected answers are the same",
    "ratio": "SHP pairs under --shp-min-ratio",
}


class Report:
    def __init__(self, enabled: dict[str, bool], unit: str, steps: tuple[str, ...] = STEPS, title: str = "data clean"):
        self.order, self.title = steps, title
        self.enabled = {step: enabled.get(step, True) for step in steps}
        self.unit = unit  # "tokens" or "characters"
        self.steps: dict[str, dict[str, Any]] = {
            s: {"in": 0, "out": 0, "dropped": Counter(), "notes": Counter()} for s in steps
        }
        self.inputs: list[dict[str, Any]] = []
        self.languages: Counter = Counter()
        self.lengths = array("q")
        self.seconds = 0.0

    def add(self, result: Result) -> None:
        stop = self.order.index(result.dropped) if result.dropped else len(self.order)
        for i, step in enumerate(self.order[: stop + 1]):
            counts = self.steps[step]
            counts["in"] += 1
            if i < stop:
                counts["out"] += len(result.pieces) if step == self.order[-1] else 1
            else:
                counts["dropped"][result.reason or "dropped"] += 1
        for key, n in result.notes.items():
            step, _, event = key.partition(":")
            self.steps[step]["notes"][event] += n
        if result.lang:
            self.languages[result.lang] += 1
        if result.dropped is None:
            self.lengths.extend(result.lengths)

    @property
    def records_out(self) -> int:
        return self.steps[self.order[-1]]["out"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "steps": [
                {
                    "step": step, "enabled": self.enabled[step], "in": c["in"], "out": c["out"],
                    "dropped": dict(c["dropped"].most_common()), "notes": dict(c["notes"].most_common()),
                }
                for step, c in self.steps.items()
            ],
            "records_out": self.records_out,
            "length_unit": self.unit,
            "lengths": summarize(self.lengths),
            "histogram": histogram(self.lengths),
            "languages": dict(self.languages.most_common()),
            "seconds": round(self.seconds, 2),
        }

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def print(self) -> None:
        """The per-step table and the histogram, on stderr."""
        from rich.table import Table

        table = Table("step", "in", "out", "dropped", "details", title=self.title, title_justify="left")
        for step, c in self.steps.items():
            if not self.enabled[step]:
                table.add_row(step, "", "", "", "off")
                continue
            dropped = sum(c["dropped"].values())
            details = [f"{reason}: {n}" for reason, n in c["dropped"].most_common(4)]
            details += [f"{event}: {n}" for event, n in c["notes"].most_common(4)]
            table.add_row(step, str(c["in"]), str(c["out"]), str(dropped) if dropped else "", "; ".join(details) or STEP_HELP[step])
        console.err.print(table)
        print_histogram(histogram(self.lengths), self.unit, summarize(self.lengths))
        if self.languages:
            console.info("languages: " + ", ".join(f"{k} {v}" for k, v in self.languages.most_common(8)))


def summarize(values) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "mean": round(sum(ordered) / len(ordered), 1),
            "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1], "total": sum(ordered)}


def histogram(values) -> dict[str, int]:
    """Counts per power-of-two bucket ('≤ 512' holds 257..512)."""
    buckets = Counter(max(64, 1 << max(0, (n - 1).bit_length())) for n in values)
    return {f"≤ {bound}": buckets[bound] for bound in sorted(buckets)}


def print_histogram(rows: dict[str, int], unit: str, summary: dict[str, float], out=None) -> None:
    from rich.table import Table

    if not rows:
        return
    most = max(rows.values())
    title = " · ".join(f"{k} {v:g}" for k, v in summary.items() if k != "total")
    table = Table(f"{unit} per conversation", "count", "", title=title, title_justify="left")
    for label, n in rows.items():
        table.add_row(label, str(n), "█" * max(1, round(30 * n / most)))
    (out or console.err).print(table)


class Progress:
    """Bytes read of the input(s): a rich bar on a terminal, one greppable line per interval
    otherwise (`clean: 52.3 MB / 186.7 MB · 5600 records · 1200 records/s`)."""

    def __init__(self, label: str, total: int | None, interval: float = 10.0):
        self.label, self.total, self.interval = label, total, interval
        self.start = self._last = time.monotonic()
        self._bar = None

    def __enter__(self) -> "Progress":
        if console.err.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TextColumn("{task.fields[records]}"), TimeRemainingColumn(),
                            console=console.err, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, records="")
        return self

    def update(self, done_bytes: int, records: int | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done_bytes, records="" if records is None else f"{records} records")
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            total = f" / {human_size(self.total)}" if self.total else ""
            elapsed = max(now - self.start, 1e-9)
            rate = f"{records} records · {records / elapsed:.0f} records/s" if records is not None else f"{human_size(done_bytes / elapsed)}/s"
            console.info(f"{self.label}: {human_size(done_bytes)}{total} · {rate}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def print_stats(figures: dict[str, Any], out) -> None:
    """`vicuna data stats` as tables (on stdout: these are the command's results)."""
    from rich.table import Table

    table = Table("", "value", title="data stats", title_justify="left")
    for inp in figures["inputs"]:
        table.add_row("input", f"{inp['path']} ({inp['format']}, {inp['container']})")
    table.add_row("records", str(figures["records"]))
    table.add_row("conversations", str(figures["conversations"]))
    for reason, n in figures["skipped"].items():
        table.add_row("skipped", f"{n} · {reason}")
    turns = figures["turns"]
    table.add_row("turns", " · ".join(f"{k} {v:g}" for k, v in turns.items() if k != "by_role"))
    table.add_row("turns by role", ", ".join(f"{k} {v}" for k, v in turns.get("by_role", {}).items()))
    table.add_row("characters", str(figures["characters"]))
    if "tokens" in figures:
        tokens = figures["tokens"]
        table.add_row(f"tokens ({tokens['template']})", " · ".join(f"{k} {v:g}" for k, v in tokens.items() if k not in ("template", "histogram")))
    if figures.get("languages"):
        table.add_row("languages", ", ".join(f"{k} {v}" for k, v in list(figures["languages"].items())[:10]))
    out.print(table)
    if "tokens" in figures:
        print_histogram(figures["tokens"]["histogram"], "tokens", {}, out)
