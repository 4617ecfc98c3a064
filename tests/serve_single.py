"""`vicuna serve -m MODEL` in single-machine mode (controller, worker and API processes under one
launcher) on free loopback ports, for the tests that drive it as a user would (the web page in a
browser, the schema fuzzer, the judge end to end) and for the benchmarks that need a server
(bench_arena.py, bench_judge.py put tests/ on sys.path): the one place that starts it. Built on
serve_cluster's Proc (own process group, log file, SIGTERM then SIGKILL on stop)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from processes import free_ports
from serve_cluster import STARTUP_TIMEOUT, Proc, get_json, wait_until

TINY_WORKER = ("--dtype", "float32", "--implementation", "native")


def start_single(root: Path, models: str | Path | list, *extra: str, headers: dict | None = None, env: dict | None = None,
                 worker_args: tuple[str, ...] = TINY_WORKER, timeout: float = STARTUP_TIMEOUT) -> Proc:
    """Start it (one worker per model) with its log in root/serve.log and wait (bounded) until
    /v1/models lists every model under its -m value; a start that fails is stopped, not leaked.
    `env` defaults to this environment with VICUNA_HOME=root/home."""
    names = [str(m) for m in (models if isinstance(models, list) else [models])]
    port, controller_port, worker_port = free_ports(3)
    args = [*(a for m in names for a in ("-m", m)), "--port", str(port), "--controller-port", str(controller_port),
            "--worker-port", str(worker_port), *worker_args, *extra]
    proc = Proc("serve", args, root / "serve.log", env or {**os.environ, "VICUNA_HOME": str(root / "home")}, port)
    try:
        listing = wait_until(lambda: (lambda r: r if r and len(r["data"]) >= len(names) else None)(
                                 get_json(f"{proc.url}/v1/models", headers=headers or {})),
                             timeout, "the model list", [proc], interval=0.5)
        assert sorted(m["id"] for m in listing["data"]) == sorted(names)  # served under the -m values
    except BaseException:
        proc.stop()
        raise
    return proc


@contextmanager
def single_server(root: Path, models: str | Path | list, *extra: str, **kwargs) -> Iterator[Proc]:
    """start_single for the length of a block: always stopped at its end."""
    proc = start_single(root, models, *extra, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()
