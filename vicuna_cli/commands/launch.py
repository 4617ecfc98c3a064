"""`vicuna launch`: start a SkyPilot recipe (core: vicuna_cli/launch/)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

LAUNCH_HELP = """Start a SkyPilot recipe (recipes/*.yaml): a training or judge recipe as a managed
spot job, a `service:` recipe with SkyServe, any other as a cluster. Needs the `sky` extra.

  vicuna launch recipes/train-vicuna-7b.yaml --env CHECKPOINT_BUCKET=my-bucket --dry-run

  vicuna launch recipes/mini-vicuna.yaml --local

  vicuna launch status | logs NAME | down NAME [--kind job|service|cluster]
"""

_ACTIONS = ("status", "logs", "down")


def launch(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe YAML, or status / logs / down."),
    target: Optional[str] = typer.Argument(None, help="logs / down: the job, service or cluster name."),
    env: Optional[List[str]] = typer.Option(None, "--env", help="KEY=VALUE for the recipe's envs (KEY alone: this shell's $KEY); repeatable."),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Print the resolved task, its vicuna commands and a cost estimate; start nothing."),
    local: Optional[bool] = typer.Option(None, "--local", help="Run setup and run on this machine (CPU recipes only)."),
    down: Optional[bool] = typer.Option(None, "--down", help="A cluster recipe: tear the cluster down when its job ends."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Job, service or cluster name (default: the recipe's name)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="auto (default: service / job / cluster from the recipe), job, service or cluster."),
    hours: Optional[float] = typer.Option(None, "--hours", help="Duration for the cost estimate (default: the recipe header's)."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="--local: work dir to use and keep (default: a temp dir, removed on success)."),
    stop_timeout: Optional[float] = typer.Option(None, "--stop-timeout", help="--local: seconds a Ctrl-C'd run gets to save and stop."),
    follow: Optional[bool] = typer.Option(None, "--follow/--no-follow", help="logs: keep following."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of the options above; flags override it."),
) -> None:
    from ..core import console
    from ..core.config import build_config
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx).items() if v is not None}
    if recipe in _ACTIONS:
        from ..launch import cloud
        from ..launch.config import ManageConfig

        flags = {k: v for k, v in flags.items() if k in ("kind", "follow")}
        cfg = build_config(ManageConfig, {"action": recipe, "name": target, **flags}, config)
        _manage(cfg, cloud, console)
        return
    from ..core.errors import VicunaError
    from ..launch import recipe as recipes
    from ..launch.config import LaunchConfig

    if target is not None:
        raise VicunaError(f"unexpected argument {target!r}", hint="vicuna launch RECIPE [--env K=V ...]; names go with logs/down")
    cfg = build_config(LaunchConfig, {**{k: v for k, v in flags.items() if k != "follow"}, "recipe": recipe}, config)
    loaded = recipes.load(cfg.recipe, recipes.parse_env(cfg.env), cfg.kind)
    if cfg.dry_run:
        from ..launch.dryrun import render

        render(loaded, cfg.hours)
        return
    if cfg.local:
        from ..launch.local import run_local

        result = run_local(loaded, cfg.local_dir, cfg.stop_timeout)
        times = " · ".join(f"{phase} {s:.0f} s" for phase, s in result.seconds.items())
        console.err.print(f"[green]done[/green] {loaded.path.name} on this machine · {times}")
        return
    from ..launch import cloud

    result = cloud.launch(loaded, cfg.name or loaded.name, cfg.down)
    console.out.print(str(result), markup=False)


def _manage(cfg, cloud, console) -> None:
    from ..core.errors import VicunaError

    if cfg.action == "status":
        console.out.print(str(cloud.status(cfg.kind)), markup=False)
        return
    if not cfg.name:
        raise VicunaError(f"vicuna launch {cfg.action} needs a name", hint=f"vicuna launch {cfg.action} NAME --kind {cfg.kind}")
    if cfg.action == "logs":
        cloud.logs(cfg.kind, cfg.name, cfg.follow)
    else:
        console.out.print(str(cloud.down(cfg.kind, cfg.name)), markup=False)
