"""`vicuna rm`: use a reward model (core: vicuna_cli/train/score.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Score answers with a reward model (from `vicuna train rm`).", no_args_is_help=True)


@app.command("score")
def score(
    ctx: typer.Context,
    input: str = typer.Argument(..., help="A pairwise file (or HH-RLHF/SHP/OASST1), a conversation file, or a FastChat answer file."),
    model: str = typer.Option(..., "-m", "--model", help="Reward model: a `train rm` run dir or a sequence classifier with one label."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the records with their reward(s) here (needed for conversations and answers)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="auto (detected), pairs, conversations or answers."),
    bench: Optional[str] = typer.Option(None, "--bench", help="FastChat answers: the questions (built-in name, question.jsonl or bench dir)."),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="Template (default: the one the model was trained with)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per forward pass, sequences packed (default 4096)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest sequence scored (default: the model's positions); longer ones are counted, not cut."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    json_output: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Score INPUT with a reward model: pair accuracy, mean margin and a table per source for pairs;
    a `reward` field on every record of conversations and FastChat answers."""
    import json

    from rich.table import Table

    from ..core import console
    from ..core.config import build_config
    from ..train.score import ScoreConfig, score as run
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx, exclude=("json_output",)).items() if v is not None}
    result = run(build_config(ScoreConfig, flags))
    figures = {"kind": result.kind, "records": result.records, "skipped": dict(result.skipped), **result.figures}
    if result.output:
        figures["output"] = str(result.output)
    if json_output:
        console.out.print(json.dumps(figures, indent=2, ensure_ascii=False), markup=False)
        return
    if result.kind == "pairs" and result.figures.get("pairs"):
        table = Table("source", "pairs", "accuracy", "mean margin", title=f"rm score · {input}", title_justify="left")
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
