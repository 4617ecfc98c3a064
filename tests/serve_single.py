"""`vicuna serve -m MODEL` in single-machine mode (controller, worker and API processes under one
launcher) on free loopback ports, for the tests that drive it as a user would: the web page in a
browser and the schema fuzzer. Built on serve_cluster's Proc (own process group, log file, SIGTERM
then SIGKILL on stop)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from serve_cluster import STARTUP_TIMEOUT, Proc, free_port, get_json, wait_until

TINY_WORKER = ("--dtype", "float32", "--implementation", "native")


@contextmanager
def single_server(root: Path, model_dir: Path | list[Path], *extra: str, headers: dict | None = None) -> Iterator[Proc]:
    """Start it (one worker per model dir), wait (bounded) until /v1/models lists every model, yield
    the Proc, always stop it. Worker ports are taken from a free one upwards."""
    dirs = model_dir if isinstance(model_dir, list) else [model_dir]
    args = [*(a for d in dirs for a in ("-m", str(d))), "--port", str(port := free_port()), "--controller-port", str(free_port()),
            "--worker-port", str(free_port()), *TINY_WORKER, *extra]
    proc = Proc("serve", args, root / "serve.log", {**os.environ, "VICUNA_HOME": str(root / "home")}, port)
    try:
        listing = wait_until(lambda: (lambda r: r if r and len(r["data"]) >= len(dirs) else None)(
                                 get_json(f"{proc.url}/v1/models", headers=headers or {})),
                             STARTUP_TIMEOUT, "the model list", [proc], interval=0.5)
        assert sorted(m["id"] for m in listing["data"]) == sorted(map(str, dirs))  # served under the -m values
        yield proc
    finally:
        proc.stop()
