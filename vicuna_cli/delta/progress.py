"""Progress over bytes for long runs: a rich bar on a terminal; otherwise one greppable line after
the first tensor and then one per interval, e.g.
`apply-delta: 12/291 tensors, 1.2 GB/2.0 GB (60%), 180.0 MB/s`."""

from __future__ import annotations

import time

from rich import progress as rp
from rich.text import Text

from ..core import console
from ..core.store import human_size


class Progress:
    def __init__(self, label: str, tensors: int, total_bytes: int, interval: float = 5.0):
        self.label, self.tensors, self.total, self.interval = label, tensors, total_bytes, interval
        self.done_tensors = self.done_bytes = 0
        self._bar: rp.Progress | None = None

    def __enter__(self) -> "Progress":
        self._start = self._last = time.monotonic()
        if console.err.is_terminal:
            self._bar = rp.Progress(
                rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=console.err,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._description(), total=self.total)
        return self

    def advance(self, nbytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += nbytes
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes, description=self._description())
            return
        now = time.monotonic()
        if self.done_tensors == 1 or now - self._last >= self.interval or self.done_tensors == self.tensors:
            self._last = now
            rate = self.done_bytes / max(now - self._start, 1e-9)
            share = self.done_bytes / max(self.total, 1)
            console.err.print(Text(
                f"{self.label}: {self.done_tensors}/{self.tensors} tensors, {human_size(self.done_bytes)}/"
                f"{human_size(self.total)} ({share:.0%}), {human_size(rate)}/s"
            ))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _description(self) -> str:
        return f"{self.label} {self.done_tensors}/{self.tensors} tensors"
