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

RECORDS_DIR = Path(__file__).resolve().parent / "records"  # committed: BENCHMARKS.md cites these
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
    """Write JSON to `path`, or to benchmarks/records/<name>-<timestamp>.json (committed: BENCHMARKS.md tables cite these records)."""
    if path:
        target = Path(path)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = RECORDS_DIR / f"{name}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def _cpu_times(count_iowait: bool = False) -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat. Busy includes steal time, and iowait
    when `count_iowait` (for warm-cache benchmarks that themselves wait on no disk: there, iowait
    means someone else's I/O is in the way)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (0 if count_iowait or len(fields) <= 4 else fields[4])
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def wait_for_idle(max_wait: float, busy_below: float = 0.10, quiet_for: int = 5, count_iowait: bool = True) -> str:
    """Wait (at most `max_wait` s) until the machine's CPUs are < `busy_below` busy for `quiet_for`
    consecutive seconds. Benchmarks on a shared box are meaningless while something else computes:
    torch's thread pool slows down many times over when it has to share cores."""
    if max_wait <= 0 or not Path("/proc/stat").exists():
        return "not checked"
    import time

    deadline = time.monotonic() + max_wait
    quiet = 0
    announced = False
    busy, total = _cpu_times(count_iowait)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        b2, t2 = _cpu_times(count_iowait)
        frac = (b2 - busy) / max(t2 - total, 1)
        busy, total = b2, t2
        quiet = quiet + 1 if frac < busy_below else 0
        if quiet >= quiet_for:
            return f"idle (CPUs < {busy_below:.0%} busy for {quiet_for} s)"
        if not announced and time.monotonic() > deadline - max_wait + quiet_for + 1:
            print(f"waiting up to {max_wait:.0f} s for the machine to go idle (CPUs {frac:.0%} busy) ...", flush=True)
            announced = True
    return f"NOT idle after {max_wait:.0f} s (CPUs still busy): figures are unreliable"


class ForeignCpu:
    """Measures how busy *other* processes kept the CPUs during a block: system-wide busy time
    (/proc/stat) minus this process's and its reaped children's CPU time (os.times).

        with ForeignCpu() as fc:
            run()
        fc.fraction  # 0.0 = nobody else computed; 0.5 = half the machine was taken by others

    `count_iowait=True` also counts time the CPUs sat waiting on disk I/O as taken by others
    (right for warm-cache benchmarks, wrong for ones that do I/O themselves). `pids`: live
    processes of the benchmark's own (workers it started: os.times sees a child's CPU time only
    once it is reaped) whose CPU time is not foreign either.
    """

    def __init__(self, count_iowait: bool = False, pids: Iterable[int] = ()):
        self.count_iowait = count_iowait
        self.pids = list(pids)

    def _workers_ticks(self) -> int:
        ticks = 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone: its last slice is lost, which errs towards "foreign"
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # as proc_stats: [11] utime, [12] stime
            ticks += int(fields[11]) + int(fields[12])
        return ticks

    def __enter__(self) -> "ForeignCpu":
        self.ok = Path("/proc/stat").exists()
        self._t = os.times()
        self._wall = self._t.elapsed
        if self.ok:
            self._busy = _cpu_times(self.count_iowait)[0]
            self._workers = self._workers_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        t = os.times()
        wall = max(t.elapsed - self._wall, 1e-6)
        own = (t.user + t.system + t.children_user + t.children_system) - (
            self._t.user + self._t.system + self._t.children_user + self._t.children_system
        )
        if not self.ok:
            self.fraction = 0.0
            return
        hz = os.sysconf("SC_CLK_TCK")
        system = (_cpu_times(self.count_iowait)[0] - self._busy) / hz
        own += (self._workers_ticks() - self._workers) / hz
        ncpu = os.cpu_count() or 1
        self.fraction = max(0.0, (system - own) / (wall * ncpu))


def proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name: [0] state, [1] ppid,
    [11] utime, [12] stime (clock ticks)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            stats[int(entry.name)] = stat[stat.rindex(")") + 2:].split()
    return stats


def descendants(roots: Iterable[int], stats: dict[int, list[str]] | None = None) -> set[int]:
    """`roots` and all their descendants (from /proc)."""
    parents = {pid: int(fields[1]) for pid, fields in (stats if stats is not None else proc_stats()).items()}
    tree = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def find_process(root: int, *words: str) -> int | None:
    """The first of `root`'s descendants whose command line has all of `words` as arguments."""
    for pid in sorted(descendants([root])):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(word in argv for word in words):
            return pid
    return None


class PeakRss:
    """One process's resident memory, and its peak since the last `reset`: writing 5 to
    /proc/PID/clear_refs resets the kernel's high-water mark (VmHWM), so the peak of each level of
    a benchmark is its own and not the process's lifetime peak. Linux only; None elsewhere."""

    def __init__(self, pid: int | None):
        self.pid = pid

    def reset(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except (OSError, TypeError):
            return False

    def read(self) -> dict[str, float | None]:
        """{"peak_rss_mb", "rss_mb"} (MiB), None when unknown."""
        found: dict[str, float | None] = {"peak_rss_mb": None, "rss_mb": None}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key = {"VmHWM:": "peak_rss_mb", "VmRSS:": "rss_mb"}.get(line.split()[0] if line else "")
                if key:
                    found[key] = int(line.split()[1]) / 1024
        except OSError:
            pass
        return found


def decode_timing(ids: list[int], times: list[float], start: float, wall: float) -> dict[str, Any]:
    """One timed generation as bench_decode reports it (its arms and peers_decode.py's workers):
    decode speed = (N - 1) tokens over the time from the first new token to the last (prefill
    excluded); `times` holds when each new token arrived (perf_counter), `start` when the run began."""
    n = len(times)
    decode_time = times[-1] - times[0] if n >= 2 else 0.0
    return {
        "ids": ids,
        "tokens": n,
        "decode_tps": (n - 1) / decode_time if n >= 2 else 0.0,
        "decode_time": decode_time,
        "ttft": times[0] - start if times else None,
        "wall": wall,
        "e2e_tps": n / wall,
    }
