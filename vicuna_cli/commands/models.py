"""`vicuna models`: list built-in aliases and cached models, or prepare one ahead of time."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import typer

app = typer.Typer(help="List and prepare models.", no_args_is_help=True)


@app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """Built-in aliases (with where they come from) and models in the caches, with sizes."""
    from rich.markup import escape
    from rich.table import Table

    from ..core.console import out
    from ..core.models import list_models

    entries = list_models()
    if as_json:
        out.print(json.dumps([asdict(e) for e in entries], indent=2), markup=False)
        return
    table = Table("name", "kind", "size", "status", "description")
    for e in entries:
        table.add_row(*(escape(v) for v in (e.name, e.kind, e.size, e.status, e.description)))
    out.print(table)


@app.command("pull")
def pull(name: Optional[str] = typer.Argument(None, help="Alias, .gguf file or Hub id (default: the embedded model).")) -> None:
    """Download or convert a model now, so the first chat starts at once. Prints its local path."""
    from ..core import console
    from ..core.models import DEFAULT_MODEL, resolve

    resolved = resolve(name or DEFAULT_MODEL)
    console.err.print(f"[green]ready:[/green] {resolved.name}")
    console.out.print(str(resolved.path), markup=False)
