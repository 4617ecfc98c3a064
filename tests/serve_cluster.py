"""Real `vicuna serve` processes for tests: controller, workers and API on free 127.0.0.1 ports.

Every process runs in its own process group with its stderr in a log file (read by tests that
check access logs); every wait is bounded; `close()` stops them all (SIGTERM, then SIGKILL of
the whole group), and the fixtures that use a Cluster always call it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from processes import free_port, signal_group, stop_group

STARTUP_TIMEOUT = 180.0  # seconds; a worker imports torch and loads a model (slow on a busy 2-core box)


class Proc:
    def __init__(self, role: str, args: list[str], log: Path, env: dict[str, str], port: int | None = None):
        self.role, self.args, self.log, self.port = role, args, log, port
        self.handle = log.open("ab")
        command = [sys.executable, "-m", "vicuna_cli", "serve", *args]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=self.handle,
                                        stderr=self.handle, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        signal_group(self.process, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        code = stop_group(self.process, timeout)
        self.handle.close()
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
        return records


def wait_until(check: Any, timeout: float, what: str, procs: list[Proc] = (), interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.role} exited with {proc.process.returncode} while waiting for {what}:\n{proc.log_text()[-3000:]}")
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get_json(url: str, **kwargs: Any) -> Any:
    try:
        response = httpx.get(url, timeout=2.0, **kwargs)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


class Cluster:
    def __init__(self, root: Path, env: dict[str, str] | None = None, secret: str = "test-secret"):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {}), "VICUNA_SERVE_SECRET": secret}
        self.env.pop("VICUNA_SERVE_STARTUP_TIMEOUT", None)
        self.secret = secret
        self.procs: list[Proc] = []
        self.controller: Proc | None = None

    def _start(self, role: str, args: list[str], port: int | None) -> Proc:
        proc = Proc(role, args, self.root / f"{role}-{len(self.procs)}.log", self.env, port)
        self.procs.append(proc)
        return proc

    def start_controller(self, expiry: float = 6.0, port: int | None = None) -> Proc:
        port = port or free_port()
        self.controller = self._start("controller", ["controller", "--port", str(port), "--expiry", str(expiry)], port)
        wait_until(lambda: get_json(f"{self.controller.url}/health"), 60, "the controller", [self.controller])
        return self.controller

    def start_worker(self, models: list[str], *args: str, heartbeat: float = 2.0) -> Proc:
        port = free_port()
        model_args = [a for m in models for a in ("-m", m)]
        return self._start("worker", ["worker", *model_args, "--port", str(port), "--controller", self.controller.url,
                                      "--heartbeat", str(heartbeat), *args], port)

    def start_api(self, *args: str, worker_timeout: float = 6.0) -> Proc:
        port = free_port()
        proc = self._start("api", ["api", "--port", str(port), "--controller", self.controller.url,
                                   "--worker-timeout", str(worker_timeout), *args], port)
        wait_until(lambda: get_json(f"{proc.url}/health"), 60, "the API server", [proc])
        return proc

    def workers(self) -> list[dict[str, Any]]:
        return get_json(f"{self.controller.url}/workers") or []

    def wait_workers(self, count: int, procs: list[Proc], timeout: float = STARTUP_TIMEOUT) -> list[dict[str, Any]]:
        return wait_until(lambda: (lambda w: w if len(w) == count else None)(self.workers()), timeout,
                          f"{count} registered worker(s)", procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stop(timeout=10)
            elif not proc.handle.closed:
                proc.handle.close()
