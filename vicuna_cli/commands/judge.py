"""`vicuna judge`: LLM-as-a-judge evaluation (questions, answers, judging, results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..judge import JUDGMENTS
from ..judge.config import BENCH_HELP, AnswerConfig, JudgeConfig
from ._common import build, derived, option_param
from .judge_arena import app as arena_app

app = typer.Typer(
    help="LLM-as-a-judge: `vicuna judge --pair A B` judges answers pairwise (both orders); "
    "see also the questions, answer and show subcommands.",
    no_args_is_help=True,
    invoke_without_command=True,
)

app.add_typer(arena_app, name="arena")

NAMES: dict[str, Any] = {
    "output": ("-o", "--output"),
    "concurrency": ("--concurrency", "-j"),
    "judge_api_base": {"param_decls": ("--judge-api-base",), "envvar": "VICUNA_JUDGE_API_BASE"},
    "price": {"param_decls": ("--price",), "annotation": Optional[str]},  # INPUT,OUTPUT
    # judge answer
    "model": ("-m", "--model"),
    "template": ("--template", "-t"),
    "api_key": {"param_decls": ("--api-key",), "envvar": "OPENAI_API_KEY", "show_envvar": False},
}


@app.callback()
@derived(JudgeConfig, NAMES, extra=[
    option_param("dry_run", bool, False, "--dry-run", help="Print the calls, estimated tokens and cost, then stop."),
    option_param("json_output", bool, False, "--json", help="Print the results as JSON."),
])
def judge(ctx: typer.Context, **options: Any) -> None:
    """Judge model answers with an LLM judge; results are cached, so a re-run resumes."""
    if ctx.invoked_subcommand is not None:
        return
    from ..core.console import info
    from ..judge import report
    from ..judge.run import DryRun, run

    config = build(ctx, JudgeConfig, exclude=("config", "dry_run", "json_output"))
    outcome = run(config, dry_run=options["dry_run"])
    if isinstance(outcome, DryRun):
        for line in outcome.lines():
            typer.echo(line)
        return
    typer.echo(json.dumps(outcome.result, indent=2)) if options["json_output"] else report.render(outcome.result)
    outcome.check()
    info(f"see `vicuna judge show {config.output}` for all judgments in {config.output}")


@app.command("questions")
def questions_cmd(
    bench: Optional[str] = typer.Option(None, "--bench", help=BENCH_HELP),
    json_output: bool = typer.Option(False, "--json", help="One JSON question per line."),
) -> None:
    """List a question set by category."""
    from ..core.console import out
    from ..judge.questions import load_bench

    qs = load_bench(bench)
    if json_output:
        for q in qs:
            typer.echo(json.dumps(q.as_dict(), ensure_ascii=False))
        return
    by_cat: dict = {}
    for q in qs:
        by_cat.setdefault(q.category, []).append(q)
    for cat, items in by_cat.items():
        refs = sum(1 for q in items if q.reference)
        out.print(f"{cat} ({len(items)} questions{f', {refs} with reference answers' if refs else ''})", style="bold")
        for q in items:
            turns = f" [{len(q.turns)} turns]" if len(q.turns) > 1 else ""
            first = q.turns[0].splitlines()[0]
            out.print(f"  {q.question_id:>4}  {first[:100]}{'...' if len(first) > 100 else ''}{turns}", markup=False)


@app.command("answer")
@derived(AnswerConfig, NAMES, config_option=False)
def answer_cmd(ctx: typer.Context, **options: Any) -> None:
    """Answer a question set (multi-turn aware) into FastChat's model-answer JSONL; resumable."""
    from ..core.console import info
    from ..judge.run import answer

    path, done, skipped = answer(build(ctx, AnswerConfig))
    info(f"{done} answers written, {skipped} already there: {path}")


@app.command("show")
def show_cmd(
    paths: Optional[List[Path]] = typer.Argument(None, help=f"Judgment files or directories (default {JUDGMENTS})."),
    bench: Optional[str] = typer.Option(None, "--bench", help="Question set, for categories of files that do not record them. " + BENCH_HELP),
    judge: Optional[str] = typer.Option(None, "--judge", help="Only this judge model's records."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="2023 review tables: the answer files' directory (maps answer*_id to models)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model the total-score ratio is relative to (default: the best)."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="Bootstrap rounds for the rating CIs."),
    duplicates: str = typer.Option("average", "--duplicates", help="Judgments of the same match repeated across files: average (each counts, FastChat's show_result), last, or error."),
    battles: Optional[Path] = typer.Option(None, "--battles", help="Arena battles (FastChat's battle JSONL): ratings from the human votes; with judgment files of the same battles, the judge's agreement with them."),
    json_output: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: relative scores and per-category scores."),
) -> None:
    """Win/tie/loss, total-score ratio, Bradley-Terry ratings and position consistency (of human votes with --battles)."""
    from ..core.console import info
    from ..core.errors import unknown_choice
    from ..judge import report, results
    from ..judge.questions import load_bench

    if duplicates not in results.DUPLICATES:
        raise unknown_choice("--duplicates policy", duplicates, list(results.DUPLICATES))
    if battles:  # human votes; judgment files given alongside: the judge's agreement with them
        from ..core.errors import VicunaError
        from ..judge.arena import summarize_battles

        if bench or answers or reference:
            raise VicunaError("--battles does not go with --bench, --answers or --reference", hint="vicuna judge show [JUDGMENTS] --battles FILE [--judge M]")

        result = summarize_battles(battles, paths, judge, bootstrap)
    else:
        result = results.summarize(paths or [JUDGMENTS], questions=load_bench(bench) if bench else None, judge=judge,
                                   reference=reference, rounds=bootstrap, duplicates=duplicates, answers=answers)
    typer.echo(json.dumps(result, indent=2)) if json_output else report.render(result)
    if plot_file:
        results.plot(result, plot_file)
        info(f"plot written to {plot_file}")
