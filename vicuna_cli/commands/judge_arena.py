"""`vicuna judge arena ...`: the votes collected by `vicuna serve --arena`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Human votes from `vicuna serve --arena`: export them for ratings (`judge show --battles`) and re-judging (`judge --battles`).",
                  no_args_is_help=True)


@app.command("export")
def export_cmd(
    db: Optional[Path] = typer.Option(None, "--db", help="The arena's SQLite file (default: serve's, $VICUNA_HOME/arena.sqlite3)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the JSONL here (atomically) instead of stdout."),
) -> None:
    """Voted battles in FastChat's battle JSONL (model_a, model_b, winner, judge, conversation_a/b, turn, anony, language, tstamp)."""
    from ..core.console import info
    from ..judge.arena import export
    from ..serve.arena_store import default_db

    path = db or default_db()
    text, count = export(path, output)
    if output is None:
        typer.echo(text, nl=False)
    info(f"{count} voted battles exported from {path}" + (f" to {output}" if output else ""))
