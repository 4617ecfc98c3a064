"""`vicuna serve -m M [-m M2 ...]`: the controller, one worker per model and the API, each a real
subprocess on this machine (the same commands one would run on separate machines).

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the launcher, which
then shuts them down in order: API and workers first (they stop accepting, finish or cancel
in-flight work, deregister), the controller last. A child that dies on its own takes the whole
deployment down with a clear error, instead of leaving a half-working server. Without --secret,
the launcher makes a random one for its children, so only they can call each other.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..core import console
from ..core.errors import VicunaError
from .config import API_KEYS_ENV, ServeConfig, env_api_keys, resolve_secret
from .security import secret_headers

STARTUP_TIMEOUT = float(os.environ.get("VICUNA_SERVE_STARTUP_TIMEOUT", "300"))


@dataclass
class Child:
    role: str
    process: subprocess.Popen

    def alive(self) -> bool:
        return self.process.poll() is None


def _die_with_parent() -> None:  # runs in the child before exec (Linux): no orphans if we are killed
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(role: str, args: list[str], env: dict[str, str]) -> Child:
    command = [sys.executable, "-m", "vicuna_cli", "serve", *args]
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    return Child(role, process)


def _common(config: ServeConfig) -> list[str]:
    return ["--host", config.host, "--shutdown-timeout", f"{config.shutdown_timeout:g}"]


def plan(config: ServeConfig) -> list[tuple[str, list[str]]]:
    """(role, arguments of `vicuna serve ...`) for every process, controller first."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    controller = f"http://{host}:{config.controller_port}"
    roles = [("controller", ["controller", "--port", str(config.controller_port), "--expiry", f"{config.expiry:g}", *_common(config)])]
    port = config.worker_port
    for model in config.model or [None]:
        for _ in range(config.workers_per_model):
            args = ["worker", "--port", str(port), "--controller", controller, "--backend", config.backend,
                    "--heartbeat", f"{config.heartbeat:g}", "--max-batch-size", str(config.max_batch_size),
                    "--max-queue", str(config.max_queue), "--prefix-cache-mb", str(config.prefix_cache_mb), "--device", config.device, "--dtype", config.dtype,
                    "--implementation", config.implementation, "--quantize", config.quantize, "--max-body-bytes", str(4 * config.max_body_bytes), *_common(config)]
            if model:
                args += ["-m", model]
            if config.template:
                args += ["--template", config.template]
            if config.trust_remote_code:
                args.append("--trust-remote-code")
            if config.threads is not None:
                args += ["--threads", str(config.threads)]
            roles.append((f"worker:{port}", args))
            port += 1
    api = ["api", "--port", str(config.port), "--controller", controller, "--max-body-bytes", str(config.max_body_bytes),
           "--moderation", config.moderation, "--worker-timeout", f"{config.expiry:g}", *_common(config)]
    if config.api_keys_file:
        api += ["--api-keys-file", str(config.api_keys_file)]
    for origin in config.cors_origin:
        api += ["--cors-origin", origin]
    if config.moderation_url:
        api += ["--moderation-url", config.moderation_url]
    if config.arena:
        api += ["--arena", "--arena-rate-limit", str(config.arena_rate_limit), "--arena-max-tokens", str(config.arena_max_tokens),
                "--arena-temperature", f"{config.arena_temperature:g}"]
        if config.arena_db:
            api += ["--arena-db", str(config.arena_db)]
    roles.append(("api", api))
    return roles


def api_env(config: ServeConfig, env: dict[str, str]) -> dict[str, str]:
    """The API's environment: its keys travel here, never on its command line (readable by any
    local user with `ps`); the environment of a process is readable by its owner only."""
    keys = [*config.api_key, *env_api_keys()]
    return {**env, API_KEYS_ENV: "\n".join(dict.fromkeys(keys))} if keys else env


def _get(url: str, secret: str | None) -> Any:
    import httpx

    try:
        response = httpx.get(url, headers=secret_headers(secret), timeout=2.0)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


class Deployment:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.secret = resolve_secret(config.secret) or secrets.token_urlsafe(24)
        self.children: list[Child] = []
        self.stop_requested = False

    def _wait(self, what: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            if self.stop_requested:
                raise KeyboardInterrupt
            if ready():
                return
            time.sleep(0.2)
        raise VicunaError(f"timed out after {timeout:g} s waiting for {what}", hint="see the log lines above")

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise VicunaError(f"the {child.role} process exited with code {child.process.returncode}",
                                  hint="see its error above (a port in use? a model that does not load?)")

    def start(self) -> None:
        env = {**{k: v for k, v in os.environ.items() if k != API_KEYS_ENV}, "VICUNA_SERVE_SECRET": self.secret}
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        controller = f"http://{host}:{self.config.controller_port}"
        roles = plan(self.config)
        self.children.append(_spawn(*roles[0], env))
        self._wait("the controller", lambda: _get(f"{controller}/health", None) is not None, 60)
        workers = roles[1:-1]
        for role, args in workers:
            self.children.append(_spawn(role, args, env))
        self._wait(
            f"{len(workers)} worker(s) to load their models and register",
            lambda: len(_get(f"{controller}/workers", self.secret) or []) >= len(workers),
            STARTUP_TIMEOUT,
        )
        self.children.append(_spawn(*roles[-1], api_env(self.config, env)))
        api = f"http://{host}:{self.config.port}"
        self._wait("the API server", lambda: _get(f"{api}/health", None) is not None, 60)
        models = sorted({m["name"] for w in _get(f"{controller}/workers", self.secret) or [] for m in w["models"]})
        console.info(f"vicuna serve: {api}/v1 · models: {', '.join(models)} · status: vicuna serve status --controller {controller}")
        if self.config.arena:
            console.info(f"arena: {api}/arena" + ("" if len(models) >= 2 else " (needs two models to run battles: serve another with -m)"))

    def run(self) -> int:
        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self.start()
            while not self.stop_requested:
                self._check_children()
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        except VicunaError:
            code = 1
            raise
        finally:
            self.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code

    def shutdown(self) -> None:
        """API and workers first (they drain and deregister), then the controller."""
        front = [c for c in self.children if c.role != "controller"]
        back = [c for c in self.children if c.role == "controller"]
        grace = self.config.shutdown_timeout + 10
        for group, timeout in ((front, grace), (back, 10.0)):
            for child in group:
                if child.alive():
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    console.warn(f"the {child.role} process did not stop in {timeout:g} s; killing it")
                    child.process.kill()
                    child.process.wait(timeout=5)
        if self.children:
            console.info("vicuna serve: stopped")


def serve_all(config: ServeConfig) -> int:
    from .config import require_serve

    require_serve()
    return Deployment(config).run()
