"""Judging runs: single grading and pairwise comparison (with position swap), resumable.

Modes (FastChat's, plus `pair`):
  single             each model's answer graded 1-10 (reference-guided for math/reasoning/coding)
  pair A B           A against B
  pairwise-baseline  every model against --baseline
  pairwise-all       every pair of models
  pairwise-scores    the original 2023 method (original.py): both answers in one prompt, two
                     scores; --pair A B, else each model after --baseline, else every pair;
                     one judge call per pair (two with --swap)
Every pairwise match is judged twice, A/B then B/A (games g1 and g2). A win counts only when both
orders agree; `results.py` turns disagreements into ties and reports the consistency rate.
Multi-turn questions get one judgment per turn (later turns judged in the context of the
conversation). Judgments go to FastChat's files `{judge}_single.jsonl` / `{judge}_pair.jsonl`
with the same fields (plus `category`, and `error` for a verdict that could not be read).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.console import warn
from ..core.errors import VicunaError
from ..core.store import atomic_write_text, exclusive
from .answers import answer_file, available_models, bench_fields, load_answers, lock_file, safe_name
from .client import ApiClient, BudgetReached, Sampling
from .pool import run_pool
from .prompts import REPAIR, JudgePrompt, pair_prompt, single_prompt, use_reference
from .questions import Question, read_jsonl
from .original import REPAIR as SCORES_REPAIR
from .original import SCORES_SCHEMA, parse_scores, review_text, scores_prompt
from .verdicts import PAIR_SCHEMA, SINGLE_SCHEMA, parse

SCHEMAS = {"pair": PAIR_SCHEMA, "single": SINGLE_SCHEMA, "scores": SCORES_SCHEMA}
REPAIRS = {**REPAIR, "scores": SCORES_REPAIR}



def schema_for(kind: str, explanation_chars: int | None = None) -> dict[str, Any]:
    """The response_format schema of a judgment kind; with `explanation_chars`, its explanation
    carries a maxLength, so a grammar-constrained endpoint closes the string and must then write
    the verdict (a small judge otherwise loops inside its explanation until max_tokens cuts it)."""
    schema = SCHEMAS[kind]
    if explanation_chars is None:
        return schema
    bounded = copy.deepcopy(schema)
    bounded["schema"]["properties"]["explanation"]["maxLength"] = explanation_chars
    return bounded


MODES = ("single", "pair", "pairwise-baseline", "pairwise-all", "pairwise-scores")
CHARS_PER_TOKEN = 4  # for --dry-run estimates; tokenizers differ, English averages about 4


@dataclass
class JudgeSettings:
    mode: str
    models: list[str]
    baseline: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    concurrency: int = 8
    allow_missing: bool = False
    parse_retries: int = 1  # repair turns asked after an unreadable verdict
    swap: bool = False  # pairwise-scores: also judge each pair in the other order
    explanation_chars: int | None = None  # the schema's maxLength on "explanation" (None: unbounded)

    @property
    def kind(self) -> str:
        """The judgment file's kind: {judge}_{kind}.jsonl."""
        return {"single": "single", "pairwise-scores": "scores"}.get(self.mode, "pair")


@dataclass(frozen=True)
class Game:
    """One judge call: a question turn and the answers in the order the judge sees them."""

    question: Question
    turn: int
    models: tuple[str, ...]  # (model,) for single; (model_1, model_2) for pairwise
    swapped: bool = False  # pairwise game 2: model_2 shown as A
    scores: bool = False  # the 2023 method: one record per game, the shown order's scores

    @property
    def match(self) -> tuple[Any, ...]:
        return (self.question.question_id, self.models, self.turn)


@dataclass
class Outcome:
    verdict: str | float | None
    user_prompt: str
    judgment: str
    prompt_name: str
    error: str | None = None


@dataclass
class RunSummary:
    path: Path
    planned_calls: int
    records: int = 0
    errors: int = 0
    stopped: str | None = None
    elapsed: float = 0.0
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def judgment_file(out_dir: Path, judge_model: str, kind: str) -> Path:
    return Path(out_dir) / f"{safe_name(judge_model)}_{kind}.jsonl"


def pairs_for(settings: JudgeSettings) -> list[tuple[str, str]]:
    models = list(dict.fromkeys(settings.models))
    if settings.mode == "pair":
        if len(models) != 2:
            raise VicunaError("--pair needs two different models", hint="vicuna judge --pair MODEL_A MODEL_B")
        return [(models[0], models[1])]
    if settings.mode == "pairwise-baseline":
        if not settings.baseline:
            raise VicunaError("--mode pairwise-baseline needs --baseline MODEL")
        pairs = [(m, settings.baseline) for m in models if m != settings.baseline]
        if not pairs:
            raise VicunaError("no model to compare with the baseline", hint="name them with --models A,B")
        return pairs
    if settings.mode == "pairwise-scores":  # the named order is kept: model_1 is A of "B reaches N % of A"
        if settings.baseline:
            return [(settings.baseline, m) for m in models if m != settings.baseline]
        return [(models[0], models[1])] if len(models) == 2 else list(itertools.combinations(sorted(models), 2))
    if settings.mode == "pairwise-all":
        if len(models) < 2:
            raise VicunaError("--mode pairwise-all needs at least two models with answers")
        return list(itertools.combinations(sorted(models), 2))
    raise VicunaError(f"not a pairwise mode: {settings.mode}")


def load_model_answers(answer_dir: Path, models: list[str], bench: tuple[str, str] | None = None) -> dict[str, dict[Any, list[str]]]:
    found = available_models(answer_dir)
    answers = {}
    for m in models:
        path = answer_file(answer_dir, m)
        if not path.exists():
            listed = ", ".join(found) or "(none)"
            raise VicunaError(
                f"no answers for model {m!r} in {answer_dir}; available: {listed}",
                hint=f"generate them with: vicuna judge answer -m {m} -o {answer_dir}",
            )
        answers[m] = load_answers(path, bench)
    return answers


def _has(answers: dict[Any, list[str]], q: Question, turn: int) -> bool:
    return len(answers.get(q.question_id) or []) >= turn


def plan_games(questions: list[Question], answers: dict[str, dict[Any, list[str]]], settings: JudgeSettings) -> list[Game]:
    """All judge calls for the run; missing answers are an error unless --allow-missing."""
    missing = {m: [q.question_id for q in questions if not _has(a, q, len(q.turns))] for m, a in answers.items()}
    missing = {m: ids for m, ids in missing.items() if ids}
    if missing:
        parts = [f"{m} lacks {len(ids)} ({', '.join(map(str, ids[:12]))}{', ...' if len(ids) > 12 else ''})" for m, ids in missing.items()]
        message = "answers missing: " + "; ".join(parts)
        if not settings.allow_missing:
            raise VicunaError(message, hint="--allow-missing judges the rest; `vicuna judge answer` resumes to fill them")
        warn(message + " -- judged on the rest (--allow-missing)")
    games: list[Game] = []
    for q in questions:
        for turn in range(1, len(q.turns) + 1):
            if settings.mode == "single":
                games += [Game(q, turn, (m,)) for m in settings.models if _has(answers[m], q, turn)]
                continue
            scores = settings.mode == "pairwise-scores"
            for m1, m2 in pairs_for(settings):
                if _has(answers[m1], q, turn) and _has(answers[m2], q, turn):
                    games.append(Game(q, turn, (m1, m2), scores=scores))
                    if settings.swap or not scores:
                        games.append(Game(q, turn, (m1, m2), swapped=True, scores=scores))
    return games


def build_prompt(game: Game, answers: dict[str, dict[Any, list[str]]]) -> JudgePrompt:
    q = game.question
    if len(game.models) == 1:
        return single_prompt(q, answers[game.models[0]][q.question_id], game.turn)
    a, b = (game.models[1], game.models[0]) if game.swapped else game.models
    if game.scores:
        name, messages = scores_prompt(q, answers[a][q.question_id], answers[b][q.question_id], game.turn)
        return JudgePrompt(name, "scores", tuple(messages))
    return pair_prompt(q, answers[a][q.question_id], answers[b][q.question_id], game.turn)


def judge_game(client: ApiClient, prompt: JudgePrompt, sampling: Sampling, parse_retries: int,
               explanation_chars: int | None = None) -> Outcome:
    schema = schema_for(prompt.kind, explanation_chars)
    messages = prompt.as_messages()
    reply = client.complete(messages, sampling, schema)
    texts = [reply.text]
    verdict = _verdict(prompt.kind, reply.text)
    for _ in range(parse_retries):
        if verdict is not None:
            break
        messages = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": REPAIRS[prompt.kind]}]
        reply = client.complete(messages, sampling, schema)
        texts.append(reply.text)
        verdict = _verdict(prompt.kind, reply.text)
    error = None if verdict is not None else f"no readable verdict after {len(texts)} replies"
    if prompt.kind == "scores":
        texts[-1] = review_text(texts[-1], verdict)  # type: ignore[arg-type]
    return Outcome(verdict, prompt.messages[-1][1], "\n\n[repair]\n".join(texts), prompt.name, error)


def _verdict(kind: str, text: str | None) -> Any:
    return parse_scores(text) if kind == "scores" else parse(kind, text)


class JudgmentWriter:
    """Appends each record as it is made; at the end rewrites the file with one record per game
    (a re-run replaces its own earlier records and keeps everything else, e.g. other models).

    The file is locked from open to rewrite: a second run on the same file waits (saying for
    whom), since its rewrite would otherwise replace the file while the first run appends to it,
    and those appends would be lost (issue #18: two runs, "6 judgments written" each, 11 rows).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = exclusive(lock_file(self.path), str(self.path), warn)
        self._lock.__enter__()
        self._out = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._out.flush()

    def close(self) -> None:
        try:
            self._out.close()
            rows: dict[tuple, dict[str, Any]] = {}
            for row in read_jsonl(self.path):
                models = (row.get("model"),) if "model" in row else (row.get("model_1"), row.get("model_2"))
                rows[(str(row.get("judge", ["?"])[0]), str(row.get("question_id")), models, row.get("turn", 1))] = row
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()))
        finally:
            self._lock.__exit__(None, None, None)


def _common_fields(game: Game) -> dict[str, Any]:
    """What every record says about its question: category, and where a reference came from."""
    q = game.question
    fields: dict[str, Any] = {"category": q.category, **bench_fields(q)}
    if use_reference(q, game.turn):
        fields["reference_source"] = q.reference_source or "inline"
    return fields


def single_record(game: Game, judge_model: str, o: Outcome) -> dict[str, Any]:
    row = {
        "question_id": game.question.question_id, "model": game.models[0],
        "judge": [judge_model, o.prompt_name], "user_prompt": o.user_prompt, "judgment": o.judgment,
        "score": o.verdict if o.verdict is not None else -1, "turn": game.turn, "tstamp": time.time(),
        **_common_fields(game),
    }
    return {**row, "error": o.error} if o.error else row


def _winner(verdict: Any, swapped: bool) -> str:
    if verdict is None:
        return "error"
    if verdict == "tie":
        return "tie"
    first = "model_2" if swapped else "model_1"
    second = "model_1" if swapped else "model_2"
    return first if verdict == "A" else second


def pair_record(game: Game, judge_model: str, g1: Outcome, g2: Outcome) -> dict[str, Any]:
    row = {
        "question_id": game.question.question_id, "model_1": game.models[0], "model_2": game.models[1],
        "g1_winner": _winner(g1.verdict, False), "g2_winner": _winner(g2.verdict, True),
        "judge": [judge_model, g1.prompt_name], "g1_user_prompt": g1.user_prompt, "g1_judgment": g1.judgment,
        "g2_user_prompt": g2.user_prompt, "g2_judgment": g2.judgment, "turn": game.turn, "tstamp": time.time(),
        **_common_fields(game),
    }
    errors = [e for e in (g1.error and f"g1: {g1.error}", g2.error and f"g2: {g2.error}") if e]
    return {**row, "error": "; ".join(errors)} if errors else row


def scores_record(game: Game, judge_model: str, o: Outcome) -> dict[str, Any]:
    """One 2023-style review: model_1 is the answer shown first (Assistant 1), score[0] its score."""
    first, second = (game.models[1], game.models[0]) if game.swapped else game.models
    row = {
        "review_id": uuid.uuid4().hex[:22], "question_id": game.question.question_id, "model_1": first, "model_2": second,
        "reviewer_id": o.prompt_name, "judge": [judge_model, o.prompt_name], "text": o.judgment,
        "score": list(o.verdict) if o.verdict is not None else [-1, -1], "swapped": game.swapped,
        "user_prompt": o.user_prompt, "turn": game.turn, "tstamp": time.time(), **_common_fields(game),
    }
    return {**row, "error": o.error} if o.error else row


def estimate(games: list[Game], answers: dict[str, dict[Any, list[str]]], client: ApiClient, settings: JudgeSettings) -> dict[str, int]:
    """Calls not yet in the cache and their prompt size (characters / CHARS_PER_TOKEN)."""
    calls = prompt_chars = 0
    for game in games:
        prompt = build_prompt(game, answers)
        schema = schema_for(prompt.kind, settings.explanation_chars)
        if not client.cached(prompt.as_messages(), settings.sampling, schema):
            calls += 1
            prompt_chars += sum(len(content) for _, content in prompt.messages)
    references: dict[str, int] = {}
    for game in games:
        if (source := _common_fields(game).get("reference_source")):
            references[source] = references.get(source, 0) + 1
    return {"games": len(games), "calls": calls, "cached": len(games) - calls, "prompt_tokens": prompt_chars // CHARS_PER_TOKEN,
            "references": references}


def run(
    games: list[Game],
    answers: dict[str, dict[Any, list[str]]],
    client: ApiClient,
    settings: JudgeSettings,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> RunSummary:
    kind = settings.kind
    path = judgment_file(out_dir, client.model, kind)
    summary = RunSummary(path, len(games))
    writer = JudgmentWriter(path)
    pending: dict[tuple, dict[bool, Outcome]] = {}
    done_games = 0
    start = time.perf_counter()

    def work(game: Game) -> Outcome:
        return judge_game(client, build_prompt(game, answers), settings.sampling, settings.parse_retries,
                          settings.explanation_chars)

    def on_result(game: Game, outcome: Outcome) -> None:
        nonlocal done_games
        done_games += 1
        if progress:
            progress(done_games, len(games))
        if kind == "single":
            row = single_record(game, client.model, outcome)
        elif kind == "scores":
            row = scores_record(game, client.model, outcome)
        else:
            halves = pending.setdefault(game.match, {})
            halves[game.swapped] = outcome
            if len(halves) < 2:
                return
            row = pair_record(game, client.model, halves[False], halves[True])
            del pending[game.match]
        writer.write(row)
        summary.records += 1
        summary.errors += int("error" in row)

    try:
        run_pool(games, work, settings.concurrency, on_result)
    except BudgetReached as exc:
        summary.stopped = str(exc)
    finally:
        writer.close()
        summary.elapsed = time.perf_counter() - start
        summary.calls, summary.cache_hits, summary.retries = client.calls, client.cache_hits, client.retries
        summary.prompt_tokens, summary.completion_tokens = client.prompt_tokens, client.completion_tokens
    return summary
