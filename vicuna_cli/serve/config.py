"""The typed configs of `vicuna serve` and its roles (defaults < --config YAML < flags), checked
here once with messages that name the flag, and the functions that run each role."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from ..core.choices import Device, Dtype
from ..core.config import CommandConfig
from ..core.errors import VicunaError
from ..core.hf import TRUST_REMOTE_CODE_HELP
from ..core.quantize import QUANTIZE_HELP, Quantize
from ..core.threads import Threads


# A 2-core box under load was seen missing 6 s of heartbeats from a busy worker: 15 s by default,
# for the controller's expiry and the API's worker timeout alike (and their Python functions).
WORKER_EXPIRY = 15.0


class _Common(CommandConfig):
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes it to the network.")
    secret: Optional[str] = Field(None, description="Shared secret between the roles [env: VICUNA_SERVE_SECRET].")
    insecure: bool = Field(False, description="Allow listening beyond loopback without --secret (anyone reaching the port can call it).")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM/Ctrl-C.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 beyond).")


class _Expiry(CommandConfig):
    expiry: float = Field(WORKER_EXPIRY, gt=0, le=86400, description="Seconds of silence after which the controller drops a worker.")


def check_quantize(backend: str, quantize: str) -> None:
    """int8 weights are vicuna's own engine (hf backend, native path); another backend cannot."""
    if quantize == "int8" and backend != "hf":
        raise ValueError(f"--quantize int8 runs in vicuna's own engine (--backend hf), not the {backend} backend; "
                         "use --quantize auto or none with it")


class EngineOptions(CommandConfig):
    """How a worker runs its models: the ONE declaration, shared by `serve worker` and by `serve`,
    which hands them to every worker it starts."""

    model: list[str] = Field([], description="Model to serve (alias, dir, .gguf, Hub id); repeat for several. Default: the embedded model.")
    template: Optional[str] = Field(None, description="Conversation template for all models (default: each model's own).")
    backend: str = Field("hf", description="hf (batching, default), vllm (GPU extra) or openai (proxy to --upstream).")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1, mps.")
    dtype: Dtype = Field("auto", description="auto, bfloat16 (bf16), float16 (fp16) or float32 (fp32).")
    implementation: str = Field("auto", description="auto, native or transformers (hf backend).")
    quantize: Quantize = Field("auto", description=QUANTIZE_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)
    threads: Threads = None
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most requests decoded together per worker.")
    max_queue: int = Field(256, ge=1, le=100000, description="Most requests waiting per worker beyond its running batch; beyond it: 429.")
    prefix_cache_mb: int = Field(256, ge=0, le=1 << 20, description="Memory per model for reusing repeated prompt prefixes (hf backend, native models); 0: off.")
    heartbeat: float = Field(2.0, gt=0, le=3600, description="Seconds between worker heartbeats.")

    @model_validator(mode="after")
    def _quantize_fits_backend(self):
        check_quantize(self.backend, self.quantize)
        return self


class ControllerConfig(_Common, _Expiry):
    port: int = Field(21001, ge=0, le=65535, description="Port to listen on.")


class WorkerConfig(_Common, EngineOptions):
    name: list[str] = Field([], description="Name to serve each -m under (default: the -m value).")
    controller: Optional[str] = Field("http://127.0.0.1:21001", description="URL of the controller.")
    port: int = Field(21002, ge=0, le=65535, description="Port to listen on.")
    advertise: Optional[str] = Field(None, description="URL the API reaches this worker at (default http://HOST:PORT).")
    upstream: Optional[str] = Field(None, description="openai backend: upstream base URL, e.g. https://api.openai.com/v1.")
    upstream_model: Optional[str] = Field(None, description="openai backend: model id upstream (default: -m).")
    upstream_key_env: str = Field("OPENAI_API_KEY", description="openai backend: env var holding the upstream key.")
    # The API re-encodes a client's body (at most --max-body-bytes, 1 MiB) as JSON for us; escapes
    # can make it up to 3x longer.
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body accepted (413 beyond); 4x the API's, which re-encodes bodies.")

    @model_validator(mode="after")
    def _check(self):
        from .backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
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
    controller: str = Field("http://127.0.0.1:21001", description="URL of the controller.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: list[str] = Field([], description="Require this API key (repeatable; also one per line in $VICUNA_SERVE_API_KEYS); /health stays open.")
    api_keys_file: Optional[Path] = Field(None, description="File of API keys, one per line.")
    cors_origin: list[str] = Field([], description="Allow browser calls from this origin (repeatable; * for any). Off by default.")
    moderation: str = Field("off", description="Input filter: off, openai, or keywords:FILE.")
    moderation_url: Optional[str] = Field(None, description="Moderation endpoint for --moderation openai.")
    worker_timeout: float = Field(WORKER_EXPIRY, gt=0, le=3600, description="Seconds of worker silence before a request fails (use the controller's --expiry).")
    # The side-by-side battle page at /arena and its API (arena.py); 0.7 is FastChat's arena temperature.
    arena: bool = Field(False, description="Also serve the arena at /arena: two anonymous models answer one prompt side by side, the user votes.")
    arena_db: Optional[Path] = Field(None, description="SQLite file of the arena's battles and votes (default $VICUNA_HOME/arena.sqlite3).")
    arena_rate_limit: int = Field(30, ge=1, le=100000, description="Arena requests (battles and votes) per client per minute; beyond it: 429.")
    arena_max_tokens: int = Field(512, ge=1, le=1 << 20, description="Longest arena answer, in tokens.")
    arena_temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature of arena answers.")

    def arena_settings(self):
        """The arena's settings when --arena is on, else None."""
        if not self.arena:
            return None
        from .arena import ArenaSettings
        from .arena_store import default_db

        return ArenaSettings(db=self.arena_db or default_db(), rate_limit=self.arena_rate_limit,
                             max_tokens=self.arena_max_tokens, temperature=self.arena_temperature)


class ServeConfig(EngineOptions, ApiConfig, _Expiry):
    """`vicuna serve -m M [-m M2]`: everything on one machine; the engine options go to every worker."""

    port: int = Field(8000, ge=0, le=65535, description="Port of the API server.")
    controller_port: int = Field(21001, ge=0, le=65535, description="Port of the controller.")
    worker_port: int = Field(21002, ge=0, le=65535, description="Port of the first worker (the next ones count up).")
    workers_per_model: int = Field(1, ge=1, le=16, description="Worker processes per model.")

    @model_validator(mode="after")
    def _expiry_after_heartbeat(self):
        if self.expiry <= self.heartbeat:
            raise ValueError(f"--expiry ({self.expiry:g} s) must be longer than --heartbeat ({self.heartbeat:g} s)")
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
