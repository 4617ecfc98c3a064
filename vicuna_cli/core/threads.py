"""How many torch threads to run: one per CPU that other processes leave free, re-decided while
running.

Why: torch's OpenMP threads spin while they wait for each other. On a 2-core machine with one
CPU-bound neighbour, 2 threads fight the neighbour for the cores and batch-1 decode fell from
~22 to 2-4 tok/s, while 1 thread kept 12-15. A fixed count is wrong either on an idle machine or
on a busy one (a laptop is never idle), so the count follows the CPU time others use.

Three parts:
  - `choose_threads(cpus, others, current)`: the decision, a pure function of the readings
    (unit-tested with injected numbers, no timing);
  - `CpuSample` / `sample_cpu`: the readings, from /proc/stat (busy time of the CPUs this process
    may run on) minus this process's own CPU time (os.times), over the interval between samples;
  - `ThreadPolicy`: applies the decision at start and re-checks every `CHECK_EVERY` engine steps
    (at least `MIN_INTERVAL` s apart, and at once after `MAX_INTERVAL` s, e.g. the first step of
    a chat turn after the user typed for a while). `torch.set_num_threads` is per OS thread for
    OpenMP, so it is applied in the thread that computes, again whenever that thread changes.

`--threads N` (every command that runs a model) or `VICUNA_THREADS=N` fixes the count instead;
0 is an error, more than the CPUs is clamped with a warning.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Mapping, Optional

from pydantic import AfterValidator, Field

from .errors import VicunaError

THREADS_ENV = "VICUNA_THREADS"
THREADS_HELP = (f"Torch threads; default: one per CPU other processes leave free, re-checked while running "
                f"[env: {THREADS_ENV}].")


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"must be 1 or more, got {value} (leave it out to use one thread per free CPU)")
    return value


# The one declaration of --threads: a config field `threads: Threads = None` (None: adapt).
Threads = Annotated[Optional[int], AfterValidator(_at_least_one), Field(description=THREADS_HELP)]

# A thread is added only when nearly a whole core is free, and dropped once others take half of
# one: between the two the count stays, so readings near a boundary do not flap it. Against 2
# spinning threads a CPU-bound neighbour gets only ~2/3 of a core (3 runnable threads on 2 cores),
# which must still read as "drop one".
UP_SLACK = 0.25  # add a thread when free CPUs >= current + 0.75
DOWN_SLACK = 0.5  # drop one when free CPUs < current - 0.5
CHECK_EVERY = 8  # engine steps between checks ...
MIN_INTERVAL = 0.25  # ... at least this many seconds apart (enough /proc/stat ticks to be meaningful)
MAX_INTERVAL = 1.0  # a step this long after the last check re-checks at once


def choose_threads(cpus: int, others: float, current: int | None = None) -> int:
    """Threads for `cpus` usable CPUs of which other processes kept `others` CPUs' worth busy
    (0..cpus) over the last interval; `current` is the count in use (None at start)."""
    cpus = max(1, cpus)
    free = cpus - min(max(others, 0.0), float(cpus))
    up = math.floor(free + UP_SLACK)
    if current is None:
        return min(cpus, max(1, up))
    down = math.floor(free + DOWN_SLACK)
    if up > current:
        target = up
    elif down < current:
        target = down
    else:
        target = current
    return min(cpus, max(1, target))


# ---------------------------------------------------------------------------------------------
# Readings


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_quota() -> float | None:
    """The CPU quota in CPUs (cgroup v2 cpu.max, or v1 cfs), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CpuSample:
    at: float  # monotonic seconds
    busy: float  # CPU-seconds the usable CPUs were busy since boot (/proc/stat)
    own: float  # CPU-seconds this process used (all its threads)


def others_between(a: CpuSample, b: CpuSample, cpus: int) -> float:
    """CPUs' worth of time other processes used between two samples (0..cpus)."""
    wall = b.at - a.at
    if wall <= 0:
        return 0.0
    return min(float(cpus), max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / wall))


def sample_cpu(cpu_ids: frozenset[int] | None = None) -> CpuSample | None:
    """Busy time of the CPUs in `cpu_ids` (all when None) and this process's CPU time; None where
    /proc/stat is missing (not Linux): the policy then keeps one thread per usable CPU."""
    at = time.monotonic()
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy_ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            if not name.startswith("cpu"):
                break  # the per-CPU lines come first
            continue
        if cpu_ids is not None and int(name[3:]) not in cpu_ids:
            continue
        fields = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
        busy_ticks += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    t = os.times()
    return CpuSample(at=at, busy=busy_ticks / os.sysconf("SC_CLK_TCK"), own=t.user + t.system)


# ---------------------------------------------------------------------------------------------
# The setting and the policy


def requested_threads(threads: int | None, env: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """The fixed count asked for: `threads` (--threads, a config file) first, else $VICUNA_THREADS;
    (None, "") means adapt. The second item names where it came from, for messages."""
    if threads is not None:
        source, value = "--threads", threads
    else:
        raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
        if not raw:
            return None, ""
        source = THREADS_ENV
        try:
            value = int(raw)
        except ValueError:
            raise VicunaError(f"{THREADS_ENV}={raw!r} is not a whole number",
                              hint=f"set it to 1 or more, or unset it to adapt to the free CPUs") from None
    if isinstance(value, bool) or value < 1:
        raise VicunaError(f"{source} must be 1 or more, got {value}",
                          hint=f"leave {source} out to use one thread per free CPU")
    return value, source


def running_now() -> int | None:
    """Runnable threads on the machine right now (/proc/loadavg), None where unknown."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class ThreadPolicy:
    """Sets torch's thread count from `choose_threads` (or the fixed request) and keeps it up to
    date: call `tick()` once per engine step, in the thread that computes.

    Readings, clock and setter are injectable: tests drive it with made-up samples and a fake
    clock, so nothing in them depends on timing.
    """

    def __init__(
        self,
        threads: int | None = None,
        *,
        cpus: int | None = None,
        sampler: Callable[[], CpuSample | None] | None = None,
        running: Callable[[], int | None] = running_now,
        clock: Callable[[], float] = time.monotonic,
        apply: Callable[[int], None] | None = None,
        warn: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
        check_every: int = CHECK_EVERY,
    ):
        self.cpus = cpus if cpus is not None else usable_cpus()
        fixed, source = requested_threads(threads, env)
        if fixed is not None and fixed > self.cpus:
            if warn is None:
                from .console import warn
            warn(f"{source} {fixed} is more than the {self.cpus} CPU(s) this process may use: using {self.cpus}")
            fixed = self.cpus
        self.fixed = fixed
        if sampler is None:
            ids = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            sampler = lambda: sample_cpu(ids)  # noqa: E731
        self._sampler = sampler
        self._clock = clock
        self._apply_fn = apply
        self.check_every = max(1, check_every)
        self._steps = 0
        self._last = self._sampler() if fixed is None else None
        self.threads = fixed or self._initial(running())
        self.changes = 0  # how often the count changed while running
        self._applied_in: int | None = None

    def _initial(self, running: int | None) -> int:
        """At start no interval has passed yet: the threads runnable right now, minus the one
        asking, stand in for the others' load; the first check corrects a wrong guess."""
        if running is None:
            return self.cpus
        return choose_threads(self.cpus, float(max(0, running - 1)), None)

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def describe(self) -> str:
        if self.fixed is not None:
            return f"{self.fixed} (fixed)"
        return f"{self.threads} of {self.cpus} (adapting to the free CPUs)"

    def tick(self) -> int:
        """One engine step: re-check when due, and make sure this thread runs `threads` threads."""
        self._steps += 1
        if self.fixed is None and self._last is not None:
            elapsed = self._clock() - self._last.at
            if elapsed >= MAX_INTERVAL or (self._steps >= self.check_every and elapsed >= MIN_INTERVAL):
                self._check()
        ident = threading.get_ident()
        if ident != self._applied_in:
            self._set(self.threads)
            self._applied_in = ident
        return self.threads

    def _check(self) -> None:
        sample = self._sampler()
        if sample is None:
            return
        others = others_between(self._last, sample, self.cpus)
        self._last, self._steps = sample, 0
        target = choose_threads(self.cpus, others, self.threads)
        if target != self.threads:
            self.threads = target
            self.changes += 1
            self._applied_in = None  # set below, in this thread

    def _set(self, n: int) -> None:
        if self._apply_fn is not None:
            self._apply_fn(n)
            return
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
