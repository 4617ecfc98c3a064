"""Ports and process groups for tests and benchmarks (benchmarks put tests/ on sys.path):
the one `free_port`, and the one way to stop a command started with `start_new_session=True`
(SIGTERM to its whole group, then SIGKILL), so no worker or torchrun child outlives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from contextlib import contextmanager
from typing import Iterator


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1: all bound at once, so none is handed out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group of `proc` (started with start_new_session=True) if it runs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # it exited between the poll and the kill
            pass


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> int | None:
    """SIGTERM the group, wait up to `grace` seconds, then SIGKILL it; returns the exit code."""
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.returncode
