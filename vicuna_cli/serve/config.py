"""The typed configs of `vicuna serve` and its roles (defaults < --config YAML < flags), checked
here once with messages that name the flag, and the functions that run each role."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from ..core.choices import Dtype
from ..core.config import CommandConfig
from ..core.errors import VicunaError
from ..core.quantize import Quantize
from ..core.threads import Threads


class _Common(CommandConfig):
    host: str = "127.0.0.1"
    secret: Optional[str] = None  # shared between the roles; also read from VICUNA_SERVE_SECRET
    insecure: bool = False  # allow a non-loopback bind without a secret
    shutdown_timeout: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)


class _Timing(CommandConfig):
    heartbeat: float = Field(2.0, gt=0, le=3600)
    expiry: float = Field(15.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _expiry_after_heartbeat(self):
        if self.expiry <= self.heartbeat:
            raise ValueError(f"--expiry ({self.expiry:g} s) must be longer than --heartbeat ({self.heartbeat:g} s)")
        return self


def check_quantize(backend: str, quantize: str) -> None:
    """int8 weights are vicuna's own engine (hf backend, native path); another backend cannot."""
    if quantize == "int8" and backend != "hf":
        raise ValueError(f"--quantize int8 runs in vicuna's own engine (--backend hf), not the {backend} backend; "
                         "use --quantize auto or none with it")


class ControllerConfig(_Common):
    port: int = Field(21001, ge=0, le=65535)
    expiry: float = Field(15.0, gt=0, le=86400)


class WorkerConfig(_Common):
    model: list[str] = []
    name: list[str] = []  # served names, one per -m (default: the model argument)
    port: int = Field(21002, ge=0, le=65535)
    controller: Optional[str] = "http://127.0.0.1:21001"
    advertise: Optional[str] = None  # the URL others reach this worker at (default http://host:port)
    backend: str = "hf"
    template: Optional[str] = None
    device: str = "auto"
    dtype: Dtype = "auto"
    implementation: str = "auto"
    quantize: Quantize = "none"  # auto/int8: hf backend on the native path (core/quantize.py)
    trust_remote_code: bool = False  # a model folder's own Python code runs only when True
    threads: Threads = None
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1, le=100000)
    prefix_cache_mb: int = Field(256, ge=0, le=1 << 20)
    heartbeat: float = Field(2.0, gt=0, le=3600)
    upstream: Optional[str] = None  # openai backend: base URL of the upstream API (…/v1)
    upstream_model: Optional[str] = None
    upstream_key_env: str = "OPENAI_API_KEY"
    # The API re-encodes a client's body (at most --max-body-bytes, 1 MiB) as JSON for us; escapes
    # can make it up to 3x longer.
    max_body_bytes: int = Field(4 << 20, ge=1024)

    @model_validator(mode="after")
    def _check(self):
        from .backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        check_quantize(self.backend, self.quantize)
        if self.backend == "openai" and not self.upstream:
            raise ValueError("--backend openai needs --upstream URL (an OpenAI-compatible base URL ending in /v1)")
        if self.backend == "openai" and not (self.model or self.name):
            raise ValueError("--backend openai needs -m MODEL (the upstream model id)")
        if self.name and len(self.name) != len(self.model or [None]):
            raise ValueError("give one --name per -m")
        if self.advertise:
            from .protocol import check_worker_address

            try:
                check_worker_address(self.advertise.rstrip("/"))
            except ValueError as exc:
                raise ValueError(f"--advertise: {exc}") from None
        return self


class ApiConfig(_Common):
    port: int = Field(8000, ge=0, le=65535)
    controller: str = "http://127.0.0.1:21001"
    api_key: list[str] = []
    api_keys_file: Optional[Path] = None
    cors_origin: list[str] = []
    moderation: str = "off"
    moderation_url: Optional[str] = None
    worker_timeout: float = Field(15.0, gt=0, le=3600)
    arena: bool = False  # the side-by-side battle page at /arena and its API (arena.py)
    arena_db: Optional[Path] = None  # default: $VICUNA_HOME/arena.sqlite3
    arena_rate_limit: int = Field(30, ge=1, le=100000)  # arena requests (battles + votes) per client per minute
    arena_max_tokens: int = Field(512, ge=1, le=1 << 20)
    arena_temperature: float = Field(0.7, ge=0.0, le=2.0)  # FastChat's arena default

    def arena_settings(self):
        """The arena's settings when --arena is on, else None."""
        if not self.arena:
            return None
        from .arena import ArenaSettings
        from .arena_store import default_db

        return ArenaSettings(db=self.arena_db or default_db(), rate_limit=self.arena_rate_limit,
                             max_tokens=self.arena_max_tokens, temperature=self.arena_temperature)


class ServeConfig(ApiConfig, _Timing):
    """`vicuna serve -m M [-m M2]`: everything on one machine."""

    model: list[str] = []
    template: Optional[str] = None
    backend: str = "hf"
    device: str = "auto"
    dtype: Dtype = "auto"
    implementation: str = "auto"
    quantize: Quantize = "none"  # auto/int8: hf backend on the native path (core/quantize.py)
    trust_remote_code: bool = False  # passed to every worker it starts
    threads: Threads = None  # passed to every worker (None: each adapts to the CPUs the others leave)
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1, le=100000)
    prefix_cache_mb: int = Field(256, ge=0, le=1 << 20)
    controller_port: int = Field(21001, ge=0, le=65535)
    worker_port: int = Field(21002, ge=0, le=65535)
    workers_per_model: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _quantize_fits_backend(self):
        check_quantize(self.backend, self.quantize)
        return self


def require_serve() -> None:
    """The `serve` extra, named in the error when a piece of it is missing."""
    from ..core.extras import require

    for module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "httpx"):
        require(module, "serve", "vicuna serve")


def resolve_secret(secret: str | None) -> str | None:
    import os

    return secret or os.environ.get("VICUNA_SERVE_SECRET") or None


# API keys for `serve api` from the environment, one per line: how `vicuna serve` hands them to
# its API process, since a command line is readable by every local user (`ps`).
API_KEYS_ENV = "VICUNA_SERVE_API_KEYS"


def env_api_keys() -> list[str]:
    import os

    return os.environ.get(API_KEYS_ENV, "").split()


def role_secret(config: _Common, role: str) -> str | None:
    """The shared secret; without one, a role listening beyond loopback would take registrations
    and generations from anyone who can reach it: refused unless --insecure, then said loudly."""
    from .security import is_loopback

    secret = resolve_secret(config.secret)
    if secret or is_loopback(config.host):
        return secret
    exposed = {"controller": "anyone who can reach it could register a worker",
               "worker": "anyone who can reach it could run generations on it",
               "API": "its controller and workers must then accept calls from anyone"}[role]
    if not config.insecure:
        raise VicunaError(f"the {role} would listen on {config.host} without a shared secret: {exposed}",
                          hint="give the same --secret (or $VICUNA_SERVE_SECRET) to every role, or --insecure on a network you trust")
    from ..core import console

    console.warn(f"INSECURE: the {role} listens on {config.host} without a shared secret (--insecure): {exposed}")
    return None


def run_controller(config: ControllerConfig) -> None:
    require_serve()
    from .common import run_app
    from .controller import create_app

    secret = role_secret(config, "controller")
    run_app(create_app(config.expiry, secret, config.max_body_bytes), config.host, config.port, config.shutdown_timeout)


def run_worker(config: WorkerConfig) -> None:
    require_serve()
    from .backends import HFBackend, OpenAIProxyBackend, VLLMBackend
    from .common import run_app
    from .worker import create_app

    secret = role_secret(config, "worker")
    refs = config.model or [None]
    names = config.name or [ref or _default_model_name() for ref in refs]
    backends = []
    for ref, name in zip(refs, names):
        if config.backend == "openai":
            import os

            backends.append(OpenAIProxyBackend(name, config.upstream, config.upstream_model or ref,
                                               os.environ.get(config.upstream_key_env), config.max_queue))
        elif config.backend == "vllm":
            backends.append(VLLMBackend(name, ref, config.template, config.max_batch_size, config.max_queue, config.dtype,
                                        trust_remote_code=config.trust_remote_code))
        else:
            backends.append(HFBackend(name, ref, config.template, config.device, config.dtype, config.implementation,
                                      config.max_batch_size, config.max_queue, config.prefix_cache_mb,
                                      trust_remote_code=config.trust_remote_code, threads=config.threads,
                                      quantize=config.quantize))
    address = config.advertise or f"http://{_connectable(config.host)}:{config.port}"
    if config.port == 0 and not config.advertise:
        raise VicunaError("--port 0 needs --advertise URL", hint="workers must tell the controller where to reach them")
    app = create_app(backends, config.controller, address.rstrip("/"), secret, config.heartbeat,
                     config.max_batch_size, config.max_queue, config.max_body_bytes)
    run_app(app, config.host, config.port, config.shutdown_timeout)


def run_api(config: ApiConfig) -> None:
    require_serve()
    from .api import create_app
    from .common import run_app
    from .moderation import make_moderation
    from .security import load_api_keys

    secret = role_secret(config, "API")
    keys = load_api_keys([*config.api_key, *env_api_keys()], config.api_keys_file)
    app = create_app(
        config.controller, secret, keys, config.cors_origin, config.max_body_bytes,
        make_moderation(config.moderation, config.moderation_url), config.worker_timeout, config.shutdown_timeout,
        config.arena_settings(),
    )
    run_app(app, config.host, config.port, config.shutdown_timeout)


def _default_model_name() -> str:
    from ..core.models import DEFAULT_MODEL

    return DEFAULT_MODEL


def _connectable(host: str) -> str:
    """A bind-all address is not one others can connect to: advertise this machine's address."""
    if host not in ("0.0.0.0", "", "::"):
        return host
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
