"""`vicuna judge answer`: model answers in FastChat's model-answer JSONL format, resumable.

One file per model, `{out}/{model_id}.jsonl`, one record per question:
  {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}
Multi-turn questions are answered turn by turn with the model's own earlier answers in context.
Each finished answer is appended at once (an interruption loses at most the answers in flight);
at the end the file is rewritten sorted by question id. Questions that already have an answer
are skipped, so a re-run only answers the rest.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.console import info, warn
from ..core.errors import VicunaError
from ..core.store import atomic_write_text, exclusive
from .pool import run_pool
from .questions import Question, answer_turns, read_jsonl

# Per-category sampling temperature, as in FastChat's gen_model_answer (creative tasks sample,
# tasks with one right answer are greedy).
TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7


@dataclass
class AnswerSettings:
    max_new_tokens: int = 1024
    temperature: float | None = None  # None: per category
    concurrency: int = 4
    seed: int = 0
    format: str = "fastchat"  # or "2023": answer_<model>.jsonl with `text`


def safe_name(name: str) -> str:
    """A model or judge id as a file name (ids like 'org/model:tag' keep their readable parts)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "model"


def lock_file(path: Path) -> Path:
    """The lock a run holds while it appends to and then rewrites `path`."""
    return path.parent / f".{path.name}.lock"


FORMATS = ("fastchat", "2023")


def answer_file(out_dir: Path, model_id: str, fmt: str | None = None) -> Path:
    """`{model}.jsonl`, or the 2023 tables' `answer_{model}.jsonl` (fmt "2023", or when only that exists)."""
    plain, legacy = Path(out_dir) / f"{safe_name(model_id)}.jsonl", Path(out_dir) / f"answer_{safe_name(model_id)}.jsonl"
    if fmt is None:
        return legacy if legacy.exists() and not plain.exists() else plain
    return legacy if fmt == "2023" else plain


def load_answers(path: Path, bench: tuple[str, str] | None = None) -> dict[Any, list[str]]:
    """question_id -> turns from a model-answer file (the last record of a question wins).

    Answers that record another question set than `bench` (name, hash) are refused: their ids
    would silently pair them with other questions. Files that record none (FastChat's) load.
    """
    rows = read_jsonl(path)
    if bench:
        other = next((row for row in rows if row.get("bench_hash") not in (None, bench[1])), None)
        if other:
            raise VicunaError(
                f"{path} answers bench {other.get('bench')!r} (questions hash {other['bench_hash']}), not {bench[0]!r} ({bench[1]})",
                hint="answer this bench into another directory (-o), or pass the --bench those answers were made for",
            )
    return {row.get("question_id"): answer_turns(row, str(path)) for row in rows}


def available_models(answer_dir: Path) -> list[str]:
    return sorted(p.stem.removeprefix("answer_") for p in Path(answer_dir).glob("*.jsonl")) if Path(answer_dir).is_dir() else []


def record(question: Question, model_id: str, turns: list[str], fmt: str = "fastchat") -> dict[str, Any]:
    if fmt == "2023":  # one turn in `text`, as fastchat/eval's answer tables
        return {"answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "question_id": question.question_id,
                "text": "\n\n".join(turns), "metadata": {}, **bench_fields(question)}
    return {
        "question_id": question.question_id,
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
        **bench_fields(question),
    }


def bench_fields(question: Question) -> dict[str, str]:
    """The question set an answer or judgment belongs to (extra fields FastChat's tools ignore)."""
    return {"bench": question.bench[0], "bench_hash": question.bench[1]} if question.bench else {}


def _dedupe_sorted(path: Path) -> None:
    rows: dict[Any, dict[str, Any]] = {}
    for row in read_jsonl(path):
        rows[row.get("question_id")] = row
    ordered = sorted(rows.values(), key=lambda r: (isinstance(r["question_id"], str), r["question_id"]))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))


class Answerer:
    """Produces the turns of one answer: `answer(question, settings) -> list[str]`."""

    name: str
    concurrency_limit: int | None = None

    def reply(self, messages: list[dict[str, str]], temperature: float, settings: AnswerSettings) -> str:
        raise NotImplementedError

    def answer(self, question: Question, settings: AnswerSettings) -> list[str]:
        temperature = settings.temperature
        if temperature is None:
            temperature = TEMPERATURE.get(question.category, DEFAULT_TEMPERATURE)
        messages: list[dict[str, str]] = []
        turns: list[str] = []
        for user in question.turns:
            messages.append({"role": "user", "content": user})
            text = self.reply(messages, temperature, settings).strip()
            messages.append({"role": "assistant", "content": text})
            turns.append(text)
        return turns


class LocalAnswerer(Answerer):
    """A model in this process through the chat backend (its template, stop strings, engine)."""

    concurrency_limit = 1  # one engine, one sequence at a time

    def __init__(self, model: str | None, template: str | None = None, device: str = "auto", dtype: str = "auto"):
        from ..chat.backends import LocalBackend

        self.backend = LocalBackend(model, template, device=device, dtype=dtype)
        self.name = self.backend.name

    def reply(self, messages: list[dict[str, str]], temperature: float, settings: AnswerSettings) -> str:
        from ..core.generate import ContextOverflow, SamplingParams

        params = SamplingParams(temperature=temperature, max_new_tokens=settings.max_new_tokens, seed=settings.seed)
        try:
            return "".join(self.backend.start(messages, params))
        except ContextOverflow as exc:  # recorded like FastChat's "ERROR" answers, not fatal
            warn(f"{exc.message}; recorded as an error answer")
            return f"ERROR: {exc.message}"


class ApiAnswerer(Answerer):
    """Any OpenAI-compatible endpoint (no cache: the answer file is the record)."""

    def __init__(self, api_base: str, api_key: str | None, model: str, timeout: float = 300.0):
        from .client import ApiClient

        self.client = ApiClient(api_base, api_key, model, timeout=timeout)
        self.name = model

    def reply(self, messages: list[dict[str, str]], temperature: float, settings: AnswerSettings) -> str:
        from .client import Sampling

        return self.client.complete(messages, Sampling(temperature, settings.max_new_tokens)).text


def generate_answers(
    questions: list[Question],
    answerer: Answerer,
    out_dir: Path,
    settings: AnswerSettings,
    model_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, int, int]:
    """Answer the questions that have no answer yet. Returns (file, answered now, skipped)."""
    model_id = model_id or answerer.name
    path = answer_file(out_dir, model_id, settings.format)
    path.parent.mkdir(parents=True, exist_ok=True)
    have = load_answers(path, questions[0].bench if questions else None) if path.exists() else {}
    todo = [q for q in questions if q.question_id not in have or len(have[q.question_id]) < len(q.turns)]
    skipped = len(questions) - len(todo)
    if skipped:
        info(f"{path}: {skipped} of {len(questions)} questions already answered, skipped")
    concurrency = min(settings.concurrency, answerer.concurrency_limit or settings.concurrency)
    done = 0
    # Locked like the judgment files (judging.py): the closing rewrite must not race another
    # run's appends.
    with exclusive(lock_file(path), str(path), info):
        with path.open("a", encoding="utf-8") as out:

            def on_result(question: Question, turns: list[str]) -> None:
                nonlocal done
                out.write(json.dumps(record(question, model_id, turns, settings.format), ensure_ascii=False) + "\n")
                out.flush()
                done += 1
                if progress:
                    progress(done, len(todo))

            run_pool(todo, lambda q: answerer.answer(q, settings), concurrency, on_result)
        if not path.stat().st_size:
            raise VicunaError(f"no answers were written to {path}")
        _dedupe_sorted(path)
    return path, done, skipped
