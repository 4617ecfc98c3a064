"""Bounded concurrency for judge and answer calls.

A small pool of daemon threads rather than ThreadPoolExecutor: the executor's threads are joined
at interpreter exit, so Ctrl-C would wait for every in-flight HTTP call (up to its timeout).
Results are handed to `on_result` in the calling thread, so files are written by one thread.
After the first error no new item starts; items already running finish and are kept.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_pool(items: Iterable[T], fn: Callable[[T], R], concurrency: int, on_result: Callable[[T, R], None]) -> None:
    todo: queue.Queue = queue.Queue()
    count = 0
    for item in items:
        todo.put(item)
        count += 1
    if not count:
        return
    done: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, fn(item), None))
            except BaseException as exc:  # handed to the caller's thread, re-raised there
                done.put((item, None, exc))

    threads = [threading.Thread(target=worker, daemon=True, name=f"judge-{i}") for i in range(min(max(1, concurrency), count))]
    for t in threads:
        t.start()
    first_error: BaseException | None = None
    received = 0
    try:
        while received < count:  # every item reports once, unless an error stopped the rest
            try:
                item, result, exc = done.get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and done.empty():
                    break
                continue
            received += 1
            if exc is not None:
                if first_error is None:
                    first_error = exc
                stop.set()
            else:
                on_result(item, result)
    finally:
        stop.set()
    if first_error is not None:
        raise first_error
