"""Question sets: the built-in 80 questions and FastChat's llm_judge files, loaded unchanged.

A bench is one of
  - a built-in name (`vicuna80`: 80 questions in 8 categories written for this project, with
    reference answers for math and coding; ids "vicuna80-01".. so that they cannot be taken for
    FastChat's numeric ids of other questions),
  - a FastChat `question.jsonl` file (`{question_id, category, turns, reference?}`), or
  - a FastChat bench directory (`data/mt_bench/`: `question.jsonl` plus, when present,
    `reference_answer/gpt-4.jsonl` in the model-answer format).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import VicunaError

BUILTIN = {"vicuna80": "vicuna80.jsonl"}
DEFAULT_BENCH = "vicuna80"
DEFAULT_REF_MODEL = "gpt-4"  # FastChat's gen_judgment default

# Every category used by this project and by FastChat's benches (Vicuna bench, MT-bench, its
# translations, arena-hard-200). A category outside this list is almost always a typo, and a
# typo would silently send a math question to the judge without its reference.
CATEGORIES = (
    "writing", "roleplay", "common-sense", "fermi", "counterfactual", "coding", "math", "knowledge",
    "generic", "reasoning", "extraction", "stem", "humanities", "arena-hard-200",
)
# Judges grade these badly without a reference answer (MT-bench paper, Table 4).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reference_source: str | None = None  # "inline" or the reference-answer file it came from
    bench: tuple[str, str] | None = None  # (name, hash of the whole set's questions): bench_identity

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question_id": self.question_id, "category": self.category, "turns": self.turns}
        if self.reference:
            d["reference"] = self.reference
        return {**d, **self.extra}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON Lines records; a bad line is an error naming the file and line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VicunaError(f"{path} does not exist") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VicunaError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise VicunaError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def parse_question(row: dict[str, Any], where: str) -> Question:
    qid = row.get("question_id")
    if qid is None:
        raise VicunaError(f"{where}: the question has no 'question_id'")
    category = row.get("category")
    if category not in CATEGORIES:
        raise VicunaError(
            f"{where}: question {qid} has unknown category {category!r}",
            hint="known categories: " + ", ".join(CATEGORIES),
        )
    turns = row.get("turns")
    if turns is None and isinstance(row.get("text"), str):  # the 2023 format: one turn in `text`
        turns, row = [row["text"]], {k: v for k, v in row.items() if k != "text"}
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise VicunaError(
            f"{where}: question {qid} has no 'turns' (a non-empty list of strings)",
            hint='each line needs e.g. {"question_id": 1, "category": "writing", "turns": ["..."]} (or, 2023 format, "text": "...")',
        )
    reference = row.get("reference")
    if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
        raise VicunaError(f"{where}: question {qid} has a 'reference' that is not a list of strings")
    extra = {k: v for k, v in row.items() if k not in ("question_id", "category", "turns", "reference")}
    return Question(qid, category, list(turns), list(reference) if reference else None, extra, "inline" if reference else None)


def answer_turns(row: dict[str, Any], where: str) -> list[str]:
    """The turns of a FastChat model-answer record (first choice), or of a 2023 one (`text`)."""
    if "choices" not in row and isinstance(row.get("text"), str):
        return [row["text"]]
    try:
        turns = row["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise VicunaError(f"{where}: answer for question {row.get('question_id')} has no choices[0].turns") from None
    if not isinstance(turns, list):
        raise VicunaError(f"{where}: answer for question {row.get('question_id')}: choices[0].turns is not a list")
    return [str(t) for t in turns]


def _load_file(path: Path) -> list[Question]:
    rows = read_jsonl(path)
    questions = [parse_question(row, f"{path}:{i}") for i, row in enumerate(rows, 1)]
    ids = [q.question_id for q in questions]
    dupes = sorted({str(i) for i in ids if ids.count(i) > 1})
    if dupes:
        raise VicunaError(f"{path}: duplicate question ids: {', '.join(dupes)}")
    if not questions:
        raise VicunaError(f"{path} holds no questions")
    return questions


def _attach_references(questions: list[Question], ref_file: Path) -> None:
    """FastChat's gen_judgment: the reference-guided categories take the reference model's answer
    (a model-answer file); a question's inline `reference` is used only when the file has none."""
    refs = {row.get("question_id"): answer_turns(row, str(ref_file)) for row in read_jsonl(ref_file)}
    for q in questions:
        if q.needs_reference and q.question_id in refs:
            q.reference, q.reference_source = refs[q.question_id], f"{ref_file.parent.name}/{ref_file.name}"


def bench_identity(name: str, questions: list[Question]) -> tuple[str, str]:
    """(name, hash): the hash covers every question's id, category and text, so two sets that
    reuse ids for other questions (FastChat's vicuna_bench and an edited copy) never match."""
    digest = hashlib.sha256()
    for q in questions:
        digest.update(json.dumps([str(q.question_id), q.category, q.turns], ensure_ascii=False).encode() + b"\n")
    return name, digest.hexdigest()[:16]


def load_bench(bench: str | Path | None = None, ref_model: str = DEFAULT_REF_MODEL) -> list[Question]:
    """Questions from a built-in name, a question.jsonl file or a FastChat bench directory (whose
    `reference_answer/<ref_model>.jsonl`, when the directory has reference answers, is read);
    each carries the set's identity (`bench_identity`), which answers and judgments record."""
    questions = _load_bench(bench, ref_model)
    identity = bench_identity(bench_name(bench), questions)
    for q in questions:
        q.bench = identity
    return questions


def _load_bench(bench: str | Path | None, ref_model: str) -> list[Question]:
    bench = str(bench or DEFAULT_BENCH)
    if bench in BUILTIN:
        data = resources.files("vicuna_cli.judge").joinpath("data", BUILTIN[bench])
        with resources.as_file(data) as path:
            return _load_file(path)
    path = Path(bench).expanduser()
    if path.is_dir():
        question_file = path / "question.jsonl"
        if not question_file.exists():
            raise VicunaError(f"{path} has no question.jsonl", hint="pass a FastChat bench dir such as data/mt_bench")
        questions = _load_file(question_file)
        ref_dir = path / "reference_answer"
        refs = sorted(p.stem for p in ref_dir.glob("*.jsonl")) if ref_dir.is_dir() else []
        if refs and ref_model not in refs:
            raise VicunaError(f"{ref_dir} has no {ref_model}.jsonl; reference models there: {', '.join(refs)}",
                              hint=f"pick one with --ref-model {refs[0]}")
        if refs:
            _attach_references(questions, ref_dir / f"{ref_model}.jsonl")
        return questions
    if path.is_file():
        return _load_file(path)
    raise VicunaError(
        f"no question set {bench!r}",
        hint=f"use a built-in name ({', '.join(BUILTIN)}), a question.jsonl file or a FastChat bench dir",
    )


def reference_sources(questions: list[Question]) -> dict[str, int]:
    """How many reference-guided questions take their reference from where (file or inline)."""
    counts: dict[str, int] = {}
    for q in questions:
        if q.needs_reference and q.reference:
            counts[q.reference_source or "inline"] = counts.get(q.reference_source or "inline", 0) + 1
    return counts


def bench_name(bench: str | Path | None) -> str:
    bench = str(bench or DEFAULT_BENCH)
    if bench in BUILTIN:
        return bench
    path = Path(bench)
    return path.parent.name if path.is_file() else path.name
