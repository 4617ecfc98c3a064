"""`vicuna rm`: use a reward model (core: vicuna_cli/train/score.py)."""

from __future__ import annotations

from typing import Any

import typer

from ..train.config import ScoreConfig
from ._common import build, derived, option_param

app = typer.Typer(help="Score answers with a reward model (from `vicuna train rm`).", no_args_is_help=True)


@app.command("score")
@derived(ScoreConfig, {"input": {"argument": True}, "model": ("-m", "--model"), "output": ("-o", "--output"),
                       "template": ("--template", "-t")}, config_option=False,
         extra=[option_param("json_output", bool, False, "--json", help="Print the figures as JSON on stdout.")])
def score(ctx: typer.Context, **options: Any) -> None:
    """Score INPUT with a reward model: pair accuracy, mean margin and a table per source for pairs;
    a `reward` field on every record of conversations and FastChat answers."""
    import json

    from rich.table import Table

    from ..core import console
    from ..train.score import score as run

    config = build(ctx, ScoreConfig, exclude=("json_output",))
    result = run(config)
    figures = {"kind": result.kind, "records": result.records, "skipped": dict(result.skipped), **result.figures}
    if result.output:
        figures["output"] = str(result.output)
    if options["json_output"]:
        console.out.print(json.dumps(figures, indent=2, ensure_ascii=False), markup=False)
        return
    if result.kind == "pairs" and result.figures.get("pairs"):
        table = Table("source", "pairs", "accuracy", "mean margin", title=f"rm score · {config.input}", title_justify="left")
        for source, row in [*result.figures["by_source"].items(), ("all", result.figures)]:
            table.add_row(source or "-", str(row["pairs"]), f"{row['accuracy']:.1%}", f"{row['mean_margin']:+.3f}")
        console.out.print(table)
    elif result.figures.get("mean_reward") is not None:
        console.out.print(f"{result.figures['scored']} records scored · mean reward {result.figures['mean_reward']:+.3f}",
                          markup=False)
    for reason, n in result.skipped.items():
        console.warn(f"{n} skipped: {reason}")
    if result.output:
        console.info(f"wrote {result.output} in {result.seconds:.1f} s")
