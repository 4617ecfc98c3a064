"""`vicuna serve`: an OpenAI-compatible serving system (controller, workers, API), all on this
machine with `vicuna serve -m MODEL`, or one role per machine with the subcommands.

Every role's options are the fields of its config in serve/config.py (default, help, validation),
turned into flags by `derived`; the flags below only name short forms and environment variables."""

from __future__ import annotations

from typing import Any, Callable

import typer

from ..serve.config import ApiConfig, ControllerConfig, ServeConfig, WorkerConfig
from ._common import build, derived

app = typer.Typer(
    help="Serve models over an OpenAI-compatible API: `vicuna serve -m MODEL` runs everything here; "
    "the subcommands run one role each (controller, worker, api) on different machines.",
    invoke_without_command=True,
    no_args_is_help=False,
)

NAMES: dict[str, Any] = {
    "model": ("-m", "--model"),
    "template": ("--template", "-t"),
    "secret": {"param_decls": ("--secret",), "envvar": "VICUNA_SERVE_SECRET", "show_envvar": False},
}


def _role(run: Callable[[Any], None], ctx: typer.Context, config: type) -> None:
    run(build(ctx, config))


@app.callback()
@derived(ServeConfig, NAMES, skip=("insecure",))
def serve(ctx: typer.Context, **options: Any) -> None:
    """Serve models: with no subcommand, start the controller, a worker per model and the API
    on this machine (API on 127.0.0.1:8000). Ctrl-C stops them all gracefully."""
    if ctx.invoked_subcommand is not None:
        return
    from ..serve.launcher import serve_all

    raise typer.Exit(serve_all(build(ctx, ServeConfig)))


@app.command("controller")
@derived(ControllerConfig, NAMES)
def controller(ctx: typer.Context, **options: Any) -> None:
    """Run the controller: the registry of workers that the API dispatches through."""
    from ..serve.config import run_controller

    _role(run_controller, ctx, ControllerConfig)


@app.command("worker")
@derived(WorkerConfig, NAMES)
def worker(ctx: typer.Context, **options: Any) -> None:
    """Run a model worker that registers with --controller and serves generations."""
    from ..serve.config import run_worker

    _role(run_worker, ctx, WorkerConfig)


@app.command("api")
@derived(ApiConfig, NAMES)
def api(ctx: typer.Context, **options: Any) -> None:
    """Run the OpenAI-compatible API server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    from ..serve.config import run_api

    _role(run_api, ctx, ApiConfig)


@app.command("status")
def status(
    controller: str = typer.Option(ApiConfig.model_fields["controller"].default, "--controller",
                                   help=ApiConfig.model_fields["controller"].description),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the workers the controller knows: models, queues, heartbeat ages."""
    from ..serve.status import fetch_status, render_status

    render_status(fetch_status(controller), json_output)
