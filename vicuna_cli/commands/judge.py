"""`vicuna judge`: LLM-as-a-judge evaluation (questions, answers, judging, results)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..judge import ANSWERS, JUDGMENTS
from .judge_arena import app as arena_app

app = typer.Typer(
    help="LLM-as-a-judge: `vicuna judge --pair A B` judges answers pairwise (both orders); "
    "see also the questions, answer and show subcommands.",
    no_args_is_help=True,
    invoke_without_command=True,
)

app.add_typer(arena_app, name="arena")

BENCH_HELP = "Built-in set name (vicuna80), a FastChat question.jsonl, or a FastChat bench dir (e.g. data/mt_bench)."


@app.callback()
def judge(
    ctx: typer.Context,
    pair: Optional[Tuple[str, str]] = typer.Option(None, "--pair", help="Judge MODEL_A against MODEL_B, both orders."),
    mode: Optional[str] = typer.Option(None, "--mode", help="single, pairwise-baseline, pairwise-all (--pair implies pair), or pairwise-scores (the original 2023 method: two scores in one review)."),
    swap: bool = typer.Option(False, "--swap", help="pairwise-scores: also judge each pair in the other order (position bias)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The baseline model for --mode pairwise-baseline."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models to judge (default: every answer file)."),
    bench: Optional[str] = typer.Option(None, "--bench", help=BENCH_HELP),
    ref_model: str = typer.Option("gpt-4", "--ref-model", help="A bench dir's reference_answer/<MODEL>.jsonl, used for math, reasoning and coding (an inline reference only where it has none)."),
    answers: Path = typer.Option(ANSWERS, "--answers", help="Directory of model-answer files ({model}.jsonl)."),
    output: Path = typer.Option(JUDGMENTS, "-o", "--output", help="Directory for judgment files, the judge cache and the resolved config.yaml (with --battles: judge/arena_judgment)."),
    judge_model: str = typer.Option("gpt-4.1", "--judge-model", help="The judge's model id."),
    judge_api_base: str = typer.Option("https://api.openai.com/v1", "--judge-api-base", envvar="VICUNA_JUDGE_API_BASE", help="OpenAI-compatible endpoint of the judge [env: VICUNA_JUDGE_API_BASE]."),
    judge_api_key_env: Optional[str] = typer.Option(None, "--judge-api-key-env", help="Env var holding the judge's key (default VICUNA_JUDGE_API_KEY, else OPENAI_API_KEY)."),
    concurrency: int = typer.Option(8, "--concurrency", "-j", help="Judge calls in flight at once."),
    max_calls: Optional[int] = typer.Option(None, "--max-calls", help="Stop cleanly after this many judge calls (re-run to continue)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the calls, estimated tokens and cost, then stop."),
    price: Optional[str] = typer.Option(None, "--price", help="USD per million tokens, INPUT,OUTPUT (e.g. 2,8), for --dry-run's cost."),
    est_output_tokens: int = typer.Option(300, "--est-output-tokens", help="Expected tokens per judge reply, for --dry-run."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Judge on the questions that have answers from every model."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Judge sampling temperature [default: 0; 0.2 for pairwise-scores, the original's]."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest judge reply."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per judge call before it is retried."),
    retries: int = typer.Option(6, "--retries", help="Retries of a failed call (429, 5xx, timeouts)."),
    parse_retries: int = typer.Option(1, "--parse-retries", help="Ask again this many times for an unreadable verdict."),
    structured: str = typer.Option("auto", "--structured", help="Send a JSON-schema response_format: auto (off once rejected), on, off."),
    battles: Optional[Path] = typer.Option(None, "--battles", help="Judge arena battles (FastChat's battle JSONL, `judge arena export`) and report the judge's agreement with the votes."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of the options above (e.g. `concurrency: 4`); flags override it."),
) -> None:
    """Judge model answers with an LLM judge; results are cached, so a re-run resumes."""
    if ctx.invoked_subcommand is not None:
        return
    from ..core.config import build_config, save_config
    from ..core.console import err, info, warn
    from ..core.errors import VicunaError
    from ..judge import answers as answers_mod
    from ..judge import arena, judging, report, results
    from ..judge.client import ApiClient, Cache, CACHE_FILE
    from ..judge.config import JudgeConfig
    from ..judge.questions import load_bench
    from ._common import given_flags

    cfg = build_config(JudgeConfig, given_flags(ctx, exclude=("config", "dry_run", "json_output")), config)
    run_mode = cfg.run_mode
    if cfg.battles:  # the arena's battles: each its own pair, its prompt the question
        games, model_answers = arena.battle_games(arena.load_battles(cfg.battles))
        chosen = sorted(model_answers)
    else:
        chosen = list(cfg.pair or cfg.models or answers_mod.available_models(cfg.answers))
    if run_mode == "pairwise-baseline" and cfg.baseline and cfg.baseline not in chosen:
        chosen.append(cfg.baseline)
    if not chosen:
        raise VicunaError(f"no model answers in {cfg.answers}", hint="generate them with `vicuna judge answer -m MODEL`")
    settings = judging.JudgeSettings(run_mode, chosen, cfg.baseline, cfg.sampling, cfg.concurrency, cfg.allow_missing, cfg.parse_retries, cfg.swap)
    if not cfg.battles:
        questions = load_bench(cfg.bench, cfg.ref_model)
        model_answers = judging.load_model_answers(cfg.answers, chosen, questions[0].bench)
        games = judging.plan_games(questions, model_answers, settings)
    key_env = cfg.judge_api_key_env or ("VICUNA_JUDGE_API_KEY" if os.environ.get("VICUNA_JUDGE_API_KEY") else "OPENAI_API_KEY")
    if not dry_run and "api.openai.com" in cfg.judge_api_base and not os.environ.get(key_env):
        raise VicunaError(f"no API key for the judge at {cfg.judge_api_base}: ${key_env} is empty",
                          hint="export OPENAI_API_KEY=... (or --judge-api-key-env NAME), or point --judge-api-base at another server")
    cache = Cache(cfg.output / CACHE_FILE)
    client = ApiClient(cfg.judge_api_base, os.environ.get(key_env), cfg.judge_model, cache, timeout=cfg.timeout,
                       max_retries=cfg.retries, max_calls=cfg.max_calls, schema=cfg.structured)
    if dry_run:
        est = judging.estimate(games, model_answers, client, settings.sampling)
        out_tokens = est["calls"] * min(cfg.est_output_tokens, cfg.max_tokens)
        records = est["games"] // (2 if settings.kind == "pair" else 1)
        line = f"{records} judgments planned, {est['games']} judge calls: {est['calls']} needed ({est['cached']} in the cache), ~{est['prompt_tokens']} prompt tokens + ~{out_tokens} output tokens"
        if cfg.price:
            line += f", ~${(est['prompt_tokens'] * cfg.price[0] + out_tokens * cfg.price[1]) / 1e6:.2f}"
        typer.echo(line + " (retries of unreadable verdicts not included)")
        if est["references"]:
            typer.echo("reference answers: " + ", ".join(f"{n} calls from {src}" for src, n in sorted(est["references"].items())))
        return
    save_config(cfg, cfg.output / "config.yaml")
    with err.status(f"judging {len(games)} games with {cfg.judge_model} ...") as status:
        summary = judging.run(games, model_answers, client, settings, cfg.output, lambda d, n: status.update(f"judging: {d}/{n} games"))
    report.run_summary(summary)
    unreadable = f"have no readable verdict (kept as errors, with an 'error' field, in {summary.path})"
    if summary.errors and summary.errors < summary.records:
        warn(f"{summary.errors} of {summary.records} judgments {unreadable}")
    if summary.stopped:
        warn(f"stopped: {summary.stopped}; run the same command again to continue (finished calls are cached)")
    if cfg.battles:  # the humans' verdicts, and how often this judge agreed with them
        result = arena.summarize_battles(cfg.battles, [summary.path], cfg.judge_model)
    else:
        result = results.summarize([summary.path], questions, cfg.judge_model, remap=False)
    typer.echo(json.dumps(result, indent=2)) if json_output else report.render(result)
    if summary.errors == summary.records > 0:  # the tables hold only errors: a failed run, not a result
        raise VicunaError(f"all {summary.records} judgments {unreadable}", hint="this judge never answered in the verdict format: use a stronger --judge-model")
    info(f"see `vicuna judge show {cfg.output}` for all judgments in {cfg.output}")


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
def answer_cmd(
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Local model (alias, dir, .gguf) or, with --api-base, the server's model id."),
    api_base: Optional[str] = typer.Option(None, "--api-base", help="Answer through an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", show_envvar=False, help="Key for --api-base [env: OPENAI_API_KEY]."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Name for the answers (file name); default: the model's name."),
    bench: Optional[str] = typer.Option(None, "--bench", help=BENCH_HELP),
    output: Path = typer.Option(ANSWERS, "-o", "--output", help="Directory for {model_id}.jsonl."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Longest answer per turn."),
    answer_format: str = typer.Option("fastchat", "--format", help="fastchat ({model_id}.jsonl) or 2023 (answer_{model_id}.jsonl with `text`, as fastchat/eval's tables)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default: per category, FastChat's)."),
    concurrency: int = typer.Option(4, "--concurrency", "-j", min=1, help="Questions in flight (API models; a local model answers one at a time)."),
    first_n: Optional[int] = typer.Option(None, "--first-n", min=1, help="Only the first N questions."),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="Conversation template for a local model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, mps (local model)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16, float32 (local model)."),
) -> None:
    """Answer a question set (multi-turn aware) into FastChat's model-answer JSONL; resumable."""
    from ..core.console import err, info
    from ..core.errors import VicunaError
    from ..core.errors import unknown_choice
    from ..judge.answers import FORMATS, AnswerSettings, ApiAnswerer, LocalAnswerer, generate_answers
    from ..judge.questions import load_bench

    if answer_format not in FORMATS:
        raise unknown_choice("--format", answer_format, list(FORMATS))
    qs = load_bench(bench)[:first_n]
    if answer_format == "2023" and any(len(q.turns) > 1 for q in qs):
        raise VicunaError("--format 2023 holds one answer per question; this set has multi-turn questions", hint="use --format fastchat")
    if api_base:
        if not model:
            raise VicunaError("--api-base needs -m MODEL (the server's model id)")
        answerer = ApiAnswerer(api_base, api_key, model)
    else:
        answerer = LocalAnswerer(model, template, device, dtype)
    settings = AnswerSettings(max_new_tokens, temperature, concurrency, format=answer_format)
    with err.status(f"answering {len(qs)} questions with {answerer.name} ...") as status:
        path, done, skipped = generate_answers(qs, answerer, output, settings, model_id, lambda d, n: status.update(f"answered {d}/{n}"))
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
