"""`vicuna launch --dry-run`: the resolved task, the `vicuna` commands it runs and what it costs,
printed on stdout; nothing is started and no cloud is contacted."""

from __future__ import annotations

import re
import shlex
from typing import Any

from rich.markup import escape

from ..core import console
from .cost import Estimate, estimate
from .recipe import Recipe, vicuna_commands

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def describe(recipe: Recipe) -> dict[str, Any]:
    task = recipe.task
    return {
        "name": recipe.name,
        "kind": recipe.kind,
        "num_nodes": task.num_nodes or 1,
        "resources": [str(r) for r in task.resources],
        "envs": dict(task.envs),
        "file_mounts": {str(k): str(v) for k, v in (task.file_mounts or {}).items()},
        "storage_mounts": {str(k): getattr(v, "name", None) or str(v) for k, v in (task.storage_mounts or {}).items()},
        "workdir": task.workdir,
        "service": recipe.config.get("service"),
        "setup": task.setup or "",
        "run": task.run or "",
    }


def commands(recipe: Recipe) -> list[str]:
    """The `vicuna` command lines, with the recipe's envs filled in (others stay `$NAME`)."""
    envs = {k: str(v) for k, v in recipe.task.envs.items() if v not in (None, "")}

    def fill(word: str) -> str:
        return _VAR.sub(lambda m: envs.get(m.group(1) or m.group(2), m.group(0)), word)

    return ["vicuna " + shlex.join([fill(w) for w in words]) for phase in (recipe.task.setup, recipe.task.run)
            for words in vicuna_commands(phase)]


def render(recipe: Recipe, hours: float | None = None) -> Estimate:
    info = describe(recipe)
    out = console.out
    out.print(f"[bold]{escape(info['name'])}[/bold] ({recipe.path}) · starts as a {info['kind']}"
              f" · {info['num_nodes']} node(s)")
    for key in ("resources", "envs", "file_mounts", "storage_mounts", "service"):
        if info[key]:
            out.print(f"[bold]{key}[/bold]: {escape(str(info[key]))}")
    for phase in ("setup", "run"):
        if info[phase]:
            out.print(f"[bold]{phase}[/bold]:")
            out.print(info[phase].rstrip(), markup=False)
    out.print("[bold]vicuna commands[/bold]:")
    for line in commands(recipe):
        out.print("  " + line, markup=False)
    result = estimate(recipe, hours)
    render_estimate(result)
    return result


def render_estimate(result: Estimate) -> None:
    out = console.out
    if not result.lines:
        out.print("[bold]cost[/bold]: no accelerators requested; no GPU price to estimate (CPU node prices vary by cloud)")
        return
    hours = f"{result.hours:g} h" if result.hours is not None else "? h (give --hours)"
    out.print(f"[bold]cost[/bold] over {hours}: {result.formula}; cheapest option first, "
              f"the recipe asks for {'spot' if result.use_spot else 'on-demand'}")
    sources = set()
    for line in result.lines:
        p = line.price
        if p is None:
            out.print(f"  {line.accelerators} x {line.nodes} node(s): not in the price table", markup=False)
            continue
        sources.add(f"{p.source} (prices of {p.date})")
        spot, od = line.total(True), line.total(False)
        out.print(f"  {line.accelerators} x {line.nodes} node(s): spot ${p.spot:.2f}/h ({p.spot_zone})"
                  f" = {_usd(spot)} · on-demand ${p.on_demand:.2f}/h ({p.on_demand_zone}) = {_usd(od)}", markup=False)
    for source in sorted(sources):
        out.print(f"prices: {source}", markup=False)


def _usd(value: float | None) -> str:
    return f"${value:,.0f}" if value is not None else "?"
