"""`vicuna serve`: an OpenAI-compatible serving system (controller, workers, API), all on this
machine with `vicuna serve -m MODEL`, or one role per machine with the subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import QUANTIZE, THREADS, TRUST_REMOTE_CODE

app = typer.Typer(
    help="Serve models over an OpenAI-compatible API: `vicuna serve -m MODEL` runs everything here; "
    "the subcommands run one role each (controller, worker, api) on different machines.",
    invoke_without_command=True,
    no_args_is_help=False,
)

# Options shared by several commands, defined once so each means the same everywhere.
HOST = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes it to the network.")
SECRET = typer.Option(None, "--secret", envvar="VICUNA_SERVE_SECRET", show_envvar=False,
                      help="Shared secret between the roles [env: VICUNA_SERVE_SECRET].")
SHUTDOWN = typer.Option(30.0, "--shutdown-timeout", help="Seconds in-flight requests get to finish on SIGTERM/Ctrl-C.")
CONFIG = typer.Option(None, "--config", help="YAML file of options; flags override it.")
MODELS = typer.Option(None, "-m", "--model", help="Model to serve (alias, dir, .gguf, Hub id); repeat for several. Default: the embedded model.")
TEMPLATE = typer.Option(None, "--template", "-t", help="Conversation template for all models (default: each model's own).")
BACKEND = typer.Option("hf", "--backend", help="hf (batching, default), vllm (GPU extra) or openai (proxy to --upstream).")
HEARTBEAT = typer.Option(2.0, "--heartbeat", help="Seconds between worker heartbeats.")
# A 2-core box under load was seen missing 6 s of heartbeats from a busy worker: 15 s by default.
EXPIRY = typer.Option(15.0, "--expiry", help="Seconds of silence after which the controller drops a worker.")
BATCH = typer.Option(16, "--max-batch-size", help="Most requests decoded together per worker.")
QUEUE = typer.Option(256, "--max-queue", help="Most requests waiting per worker beyond its running batch; beyond it: 429.")
PREFIX_CACHE = typer.Option(256, "--prefix-cache-mb", help="Memory per model for reusing repeated prompt prefixes (hf backend, native models); 0: off.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps.")
DTYPE = typer.Option("auto", "--dtype", help="auto, bfloat16 (bf16), float16 (fp16) or float32 (fp32).")
IMPL = typer.Option("auto", "--implementation", help="auto, native or transformers (hf backend).")
API_KEY = typer.Option(None, "--api-key", help="Require this API key (repeatable; also one per line in $VICUNA_SERVE_API_KEYS); /health stays open.")
KEYS_FILE = typer.Option(None, "--api-keys-file", help="File of API keys, one per line.")
CORS = typer.Option(None, "--cors-origin", help="Allow browser calls from this origin (repeatable; * for any). Off by default.")
BODY = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted (413 beyond).")
WORKER_BODY = typer.Option(4 << 20, "--max-body-bytes", help="Largest request body accepted (413 beyond); 4x the API's, which re-encodes bodies.")
INSECURE = typer.Option(False, "--insecure", help="Allow listening beyond loopback without --secret (anyone reaching the port can call it).")
MODERATION = typer.Option("off", "--moderation", help="Input filter: off, openai, or keywords:FILE.")
MODERATION_URL = typer.Option(None, "--moderation-url", help="Moderation endpoint for --moderation openai.")
ARENA = typer.Option(False, "--arena", help="Also serve the arena at /arena: two anonymous models answer one prompt side by side, the user votes.")
ARENA_DB = typer.Option(None, "--arena-db", help="SQLite file of the arena's battles and votes (default $VICUNA_HOME/arena.sqlite3).")
ARENA_RATE = typer.Option(30, "--arena-rate-limit", help="Arena requests (battles and votes) per client per minute; beyond it: 429.")
ARENA_TOKENS = typer.Option(512, "--arena-max-tokens", help="Longest arena answer, in tokens.")
ARENA_TEMPERATURE = typer.Option(0.7, "--arena-temperature", help="Sampling temperature of arena answers.")
CONTROLLER = typer.Option("http://127.0.0.1:21001", "--controller", help="URL of the controller.")


def _run(ctx: typer.Context, config_class: str, runner: str, config: Optional[Path]) -> None:
    from ..core.config import build_config
    from ..serve import config as serve_config
    from ._common import given_flags

    flags = given_flags(ctx)
    for name in [k for k, v in flags.items() if v is None]:
        flags.pop(name)
    cfg = build_config(getattr(serve_config, config_class), flags, config)
    getattr(serve_config, runner)(cfg)


@app.callback()
def serve(
    ctx: typer.Context,
    model: Optional[List[str]] = MODELS,
    template: Optional[str] = TEMPLATE,
    backend: str = BACKEND,
    host: str = HOST,
    port: int = typer.Option(8000, "--port", help="Port of the API server."),
    controller_port: int = typer.Option(21001, "--controller-port", help="Port of the controller."),
    worker_port: int = typer.Option(21002, "--worker-port", help="Port of the first worker (the next ones count up)."),
    workers_per_model: int = typer.Option(1, "--workers-per-model", help="Worker processes per model."),
    heartbeat: float = HEARTBEAT,
    expiry: float = EXPIRY,
    max_batch_size: int = BATCH,
    max_queue: int = QUEUE,
    prefix_cache_mb: int = PREFIX_CACHE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    implementation: str = IMPL,
    quantize: str = QUANTIZE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    threads: Optional[int] = THREADS,
    api_key: Optional[List[str]] = API_KEY,
    api_keys_file: Optional[Path] = KEYS_FILE,
    cors_origin: Optional[List[str]] = CORS,
    max_body_bytes: int = BODY,
    moderation: str = MODERATION,
    moderation_url: Optional[str] = MODERATION_URL,
    arena: bool = ARENA,
    arena_db: Optional[Path] = ARENA_DB,
    arena_rate_limit: int = ARENA_RATE,
    arena_max_tokens: int = ARENA_TOKENS,
    arena_temperature: float = ARENA_TEMPERATURE,
    secret: Optional[str] = SECRET,
    shutdown_timeout: float = SHUTDOWN,
    config: Optional[Path] = CONFIG,
) -> None:
    """Serve models: with no subcommand, start the controller, a worker per model and the API
    on this machine (API on 127.0.0.1:8000). Ctrl-C stops them all gracefully."""
    if ctx.invoked_subcommand is not None:
        return
    from ..core.config import build_config
    from ..serve.config import ServeConfig
    from ..serve.launcher import serve_all
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx).items() if v is not None}
    code = serve_all(build_config(ServeConfig, flags, config))
    raise typer.Exit(code)


@app.command("controller")
def controller(
    ctx: typer.Context,
    host: str = HOST,
    port: int = typer.Option(21001, "--port", help="Port to listen on."),
    expiry: float = EXPIRY,
    max_body_bytes: int = BODY,
    secret: Optional[str] = SECRET,
    insecure: bool = INSECURE,
    shutdown_timeout: float = SHUTDOWN,
    config: Optional[Path] = CONFIG,
) -> None:
    """Run the controller: the registry of workers that the API dispatches through."""
    _run(ctx, "ControllerConfig", "run_controller", config)


@app.command("worker")
def worker(
    ctx: typer.Context,
    model: Optional[List[str]] = MODELS,
    name: Optional[List[str]] = typer.Option(None, "--name", help="Name to serve each -m under (default: the -m value)."),
    controller: str = CONTROLLER,
    host: str = HOST,
    port: int = typer.Option(21002, "--port", help="Port to listen on."),
    advertise: Optional[str] = typer.Option(None, "--advertise", help="URL the API reaches this worker at (default http://HOST:PORT)."),
    backend: str = BACKEND,
    template: Optional[str] = TEMPLATE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    implementation: str = IMPL,
    quantize: str = QUANTIZE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    threads: Optional[int] = THREADS,
    max_batch_size: int = BATCH,
    max_queue: int = QUEUE,
    prefix_cache_mb: int = PREFIX_CACHE,
    heartbeat: float = HEARTBEAT,
    upstream: Optional[str] = typer.Option(None, "--upstream", help="openai backend: upstream base URL, e.g. https://api.openai.com/v1."),
    upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="openai backend: model id upstream (default: -m)."),
    upstream_key_env: str = typer.Option("OPENAI_API_KEY", "--upstream-key-env", help="openai backend: env var holding the upstream key."),
    max_body_bytes: int = WORKER_BODY,
    secret: Optional[str] = SECRET,
    insecure: bool = INSECURE,
    shutdown_timeout: float = SHUTDOWN,
    config: Optional[Path] = CONFIG,
) -> None:
    """Run a model worker that registers with --controller and serves generations."""
    _run(ctx, "WorkerConfig", "run_worker", config)


@app.command("api")
def api(
    ctx: typer.Context,
    controller: str = CONTROLLER,
    host: str = HOST,
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[List[str]] = API_KEY,
    api_keys_file: Optional[Path] = KEYS_FILE,
    cors_origin: Optional[List[str]] = CORS,
    max_body_bytes: int = BODY,
    moderation: str = MODERATION,
    moderation_url: Optional[str] = MODERATION_URL,
    worker_timeout: float = typer.Option(15.0, "--worker-timeout", help="Seconds of worker silence before a request fails (use the controller's --expiry)."),
    arena: bool = ARENA,
    arena_db: Optional[Path] = ARENA_DB,
    arena_rate_limit: int = ARENA_RATE,
    arena_max_tokens: int = ARENA_TOKENS,
    arena_temperature: float = ARENA_TEMPERATURE,
    secret: Optional[str] = SECRET,
    insecure: bool = INSECURE,
    shutdown_timeout: float = SHUTDOWN,
    config: Optional[Path] = CONFIG,
) -> None:
    """Run the OpenAI-compatible API server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    _run(ctx, "ApiConfig", "run_api", config)


@app.command("status")
def status(
    controller: str = CONTROLLER,
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the workers the controller knows: models, queues, heartbeat ages."""
    from ..serve.status import fetch_status, render_status

    render_status(fetch_status(controller), json_output)
