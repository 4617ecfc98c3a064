"""`vicuna serve status`: what the controller knows — workers, their models, queues and how long
ago each one last sent a heartbeat."""

from __future__ import annotations

import json
from typing import Any

from ..core import console
from ..core.errors import VicunaError


def fetch_status(controller: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    from ..core.extras import require

    httpx = require("httpx", "serve", "vicuna serve status")
    url = controller.rstrip("/") + "/workers"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise VicunaError(f"cannot reach the controller at {controller}: {type(exc).__name__}",
                          hint="is `vicuna serve controller` running there, and is --controller right?") from None
    if response.status_code != 200:
        raise VicunaError(f"the controller at {controller} answered {response.status_code}: {response.text[:200]}")
    return response.json()


def render_status(workers: list[dict[str, Any]], as_json: bool = False) -> None:
    if as_json:
        console.out.print(json.dumps({"workers": workers, "models": _models(workers)}, indent=2), markup=False)
        return
    from rich.table import Table

    table = Table(title=None, header_style="bold")
    for column in ("worker", "models", "backend", "running", "waiting", "max batch", "max queue", "heartbeat"):
        table.add_column(column, justify="right" if column in ("running", "waiting", "max batch", "max queue", "heartbeat") else "left")
    for w in workers:
        table.add_row(
            w["address"],
            ", ".join(m["name"] for m in w["models"]),
            ", ".join(sorted({m["backend"] for m in w["models"]})),
            str(w["running"]),
            str(w["waiting"]),
            str(w["max_batch_size"]),
            str(w["max_queue"]),
            f"{w['heartbeat_age']:.1f} s ago",
        )
    console.out.print(table)
    models = _models(workers)
    summary = ", ".join(f"{name} ({n} worker{'s' if n != 1 else ''})" for name, n in models.items())
    console.err.print(f"{len(workers)} live worker(s); models: {summary or '(none)'}", markup=False, highlight=False)


def _models(workers: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in workers:
        for m in w["models"]:
            counts[m["name"]] = counts.get(m["name"], 0) + 1
    return dict(sorted(counts.items()))
