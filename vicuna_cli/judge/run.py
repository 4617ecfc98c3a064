"""`vicuna judge` and `vicuna judge answer` as functions of their configs: which models, which
games, which key, which client, and the dry run's arithmetic. The command only renders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.console import err, warn
from ..core.errors import VicunaError
from .config import AnswerConfig, JudgeConfig

Progress = Callable[[int, int], None]


@dataclass
class DryRun:
    """What a run would cost: calls not in the cache and their estimated tokens."""

    records: int
    games: int
    calls: int
    cached: int
    prompt_tokens: int
    output_tokens: int
    cost: float | None  # USD, when --price is given
    references: dict[str, int] = field(default_factory=dict)  # reference-answer source: calls

    def lines(self) -> list[str]:
        line = (f"{self.records} judgments planned, {self.games} judge calls: {self.calls} needed ({self.cached} in the cache), "
                f"~{self.prompt_tokens} prompt tokens + ~{self.output_tokens} output tokens")
        if self.cost is not None:
            line += f", ~${self.cost:.2f}"
        lines = [line + " (retries of unreadable verdicts not included)"]
        if self.references:
            lines.append("reference answers: " + ", ".join(f"{n} calls from {src}" for src, n in sorted(self.references.items())))
        return lines


@dataclass
class JudgeRun:
    summary: Any  # judging.RunSummary
    result: dict  # results.summarize / arena.summarize_battles

    UNREADABLE = "have no readable verdict (kept as errors, with an 'error' field, in {path})"

    def check(self) -> None:
        """A run whose tables hold only errors failed: it is not a result."""
        if self.summary.errors == self.summary.records > 0:
            raise VicunaError(f"all {self.summary.records} judgments {self.UNREADABLE.format(path=self.summary.path)}",
                              hint="this judge never answered in the verdict format: use a stronger --judge-model")


def key_env(config: JudgeConfig) -> str:
    """The env var holding the judge's key: --judge-api-key-env, else VICUNA_JUDGE_API_KEY when
    set, else OPENAI_API_KEY."""
    return config.judge_api_key_env or ("VICUNA_JUDGE_API_KEY" if os.environ.get("VICUNA_JUDGE_API_KEY") else "OPENAI_API_KEY")


def run(config: JudgeConfig, dry_run: bool = False) -> DryRun | JudgeRun:
    from . import answers as answers_mod
    from . import arena, judging, report, results
    from ..core.config import save_config
    from .client import CACHE_FILE, ApiClient, Cache
    from .questions import load_bench

    run_mode = config.run_mode
    if config.battles:  # the arena's battles: each its own pair, its prompt the question
        games, model_answers = arena.battle_games(arena.load_battles(config.battles))
        chosen = sorted(model_answers)
    else:
        chosen = list(config.pair or config.models or answers_mod.available_models(config.answers))
    if run_mode == "pairwise-baseline" and config.baseline and config.baseline not in chosen:
        chosen.append(config.baseline)
    if not chosen:
        raise VicunaError(f"no model answers in {config.answers}", hint="generate them with `vicuna judge answer -m MODEL`")
    settings = judging.JudgeSettings(run_mode, chosen, config.baseline, config.sampling, config.concurrency,
                                     config.allow_missing, config.parse_retries, config.swap,
                                     config.explanation_chars)
    if not config.battles:
        questions = load_bench(config.bench, config.ref_model)
        model_answers = judging.load_model_answers(config.answers, chosen, questions[0].bench)
        games = judging.plan_games(questions, model_answers, settings)
    env = key_env(config)
    if not dry_run and "api.openai.com" in config.judge_api_base and not os.environ.get(env):
        raise VicunaError(f"no API key for the judge at {config.judge_api_base}: ${env} is empty",
                          hint="export OPENAI_API_KEY=... (or --judge-api-key-env NAME), or point --judge-api-base at another server")
    client = ApiClient(config.judge_api_base, os.environ.get(env), config.judge_model, Cache(config.output / CACHE_FILE),
                       timeout=config.timeout, max_retries=config.retries, max_calls=config.max_calls, schema=config.structured)
    if dry_run:
        return dry_run_plan(config, judging.estimate(games, model_answers, client, settings), settings.kind)
    save_config(config, config.output / "config.yaml")
    with err.status(f"judging {len(games)} games with {config.judge_model} ...") as status:
        summary = judging.run(games, model_answers, client, settings, config.output,
                              lambda d, n: status.update(f"judging: {d}/{n} games"))
    report.run_summary(summary)
    if summary.errors and summary.errors < summary.records:
        warn(f"{summary.errors} of {summary.records} judgments {JudgeRun.UNREADABLE.format(path=summary.path)}")
    if summary.stopped:
        warn(f"stopped: {summary.stopped}; run the same command again to continue (finished calls are cached)")
    if config.battles:  # the humans' verdicts, and how often this judge agreed with them
        result = arena.summarize_battles(config.battles, [summary.path], config.judge_model)
    else:
        result = results.summarize([summary.path], questions, config.judge_model, remap=False)
    return JudgeRun(summary, result)


def dry_run_plan(config: JudgeConfig, est: dict[str, Any], kind: str) -> DryRun:
    """The estimate priced: output tokens are --est-output-tokens per call, capped by --max-tokens."""
    out_tokens = est["calls"] * min(config.est_output_tokens, config.max_tokens)
    cost = (est["prompt_tokens"] * config.price[0] + out_tokens * config.price[1]) / 1e6 if config.price else None
    return DryRun(est["games"] // (2 if kind == "pair" else 1), est["games"], est["calls"], est["cached"],
                  est["prompt_tokens"], out_tokens, cost, est["references"])


def answer(config: AnswerConfig) -> tuple[Path, int, int]:
    """Answer the question set; (answer file, answers written, answers already there)."""
    from .answers import AnswerSettings, ApiAnswerer, LocalAnswerer, generate_answers
    from .questions import load_bench

    questions = load_bench(config.bench)[:config.first_n]
    if config.format == "2023" and any(len(q.turns) > 1 for q in questions):
        raise VicunaError("--format 2023 holds one answer per question; this set has multi-turn questions", hint="use --format fastchat")
    answerer = (ApiAnswerer(config.api_base, config.api_key, config.model) if config.api_base
                else LocalAnswerer(config.model, config.template, config.device, config.dtype))
    settings = AnswerSettings(config.max_new_tokens, config.temperature, config.concurrency, format=config.format)
    with err.status(f"answering {len(questions)} questions with {answerer.name} ...") as status:
        return generate_answers(questions, answerer, config.output, settings, config.model_id,
                                lambda d, n: status.update(f"answered {d}/{n}"))
