"""The original Vicuna evaluation (FastChat's `fastchat/eval/`, March 2023), reproduced.

The judge reads BOTH answers in one prompt, with a reviewer prompt for the question's kind
(general, coding, math), at temperature 0.2, and writes two scores on its first line ("9 8.5"),
then its explanation. The headline figure is the ratio of the total scores over the questions
("Vicuna reaches 92 % of ChatGPT"). The prompt texts here are this project's, written in the
original's spirit; the review format is the original's. `--swap` also judges every pair in the
other order, which the original did not (it showed the baseline first every time).

Its files load unchanged: `question.jsonl` ({question_id, text, category}) in questions.py,
`answer_<model>.jsonl` ({answer_id, model_id, question_id, text}) in answers.py, and the review
tables ({review_id, question_id, answer1_id, answer2_id, reviewer_id, text, score: [s1, s2]})
here, their answer ids mapped to models through the answer files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from collections import defaultdict
from typing import Any, Callable

from ..core.errors import VicunaError
from .questions import Question, read_jsonl

TEMPERATURE = 0.2  # the original's reviewer temperature

SCORES_SCHEMA: dict[str, Any] = {
    "name": "pairwise_scores",
    "strict": True,
    "schema": {
        "type": "object",
        # scores first: a reply cut off by max_tokens still carries both
        "properties": {
            "score_1": {"type": "number", "minimum": 1, "maximum": 10},
            "score_2": {"type": "number", "minimum": 1, "maximum": 10},
            "explanation": {"type": "string"},
        },
        "required": ["score_1", "score_2", "explanation"],
        "additionalProperties": False,
    },
}

SYSTEM = "You are a careful, impartial reviewer of the answers AI assistants give to users."
_OUTPUT = (
    "Give each assistant an overall score from 1 to 10, higher meaning better. On the FIRST line "
    "write only the two scores, Assistant 1's then Assistant 2's, separated by a space (for example "
    "\"8 6.5\"). From the second line on, explain your scores. The order in which the answers are "
    "shown and their length must not sway you."
)
REVIEWERS = {
    "general": "Review the two answers to the user's question for helpfulness, relevance, accuracy "
    "and level of detail. " + _OUTPUT,
    "coding": "Review the two answers as code reviews: does the code solve the problem, is it "
    "correct and efficient, is it readable and reasonably commented? Point out bugs and missed "
    "edge cases. " + _OUTPUT,
    "math": "Solve the problem yourself first, step by step. Then check each assistant's method and "
    "result against yours: a wrong final answer scores low however well it is written. " + _OUTPUT,
}
REVIEWER_OF = {"coding": "coding", "math": "math"}  # every other category: general
REPAIR = "Write only the first line: the two scores, Assistant 1's then Assistant 2's, e.g. \"8 6\"."


def reviewer(category: str) -> str:
    return REVIEWER_OF.get(category, "general")


def scores_prompt(question: Question, answer_1: list[str], answer_2: list[str], turn: int = 1) -> tuple[str, list[tuple[str, str]]]:
    """(reviewer prompt name, messages) for the 2023 method; a later turn shows the conversation."""
    kind = reviewer(question.category)
    context = "".join(f"[Earlier user question {i}]\n{q}\n\n" for i, q in enumerate(question.turns[: turn - 1], 1))
    user = (
        f"{context}[Question]\n{question.turns[turn - 1]}\n\n"
        f"[The Start of Assistant 1's Answer]\n{answer_1[turn - 1]}\n[The End of Assistant 1's Answer]\n\n"
        f"[The Start of Assistant 2's Answer]\n{answer_2[turn - 1]}\n[The End of Assistant 2's Answer]\n\n"
        f"[System]\n{REVIEWERS[kind]}"
    )
    return f"vicuna-2023-{kind}-v1", [("system", SYSTEM), ("user", user)]


# ---------------------------------------------------------------------------------------------
# Reading two scores

_NUM = r"(\d+(?:\.\d+)?)"
_OUT_OF = re.compile(r"\s*(?:/\s*10(?:\.0)?|out of 10)\b")
_LABELLED = re.compile(r"assistant\s*([12])\s*(?:'s)?\s*(?:score)?\s*[:=\-]\s*\**\s*" + _NUM, re.I)


def _valid(a: float, b: float) -> tuple[float, float] | None:
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(score of assistant 1, score of assistant 2), or None.

    As the original: two numbers on the first line ("9 8.5", "9, 8.5", "8/10 and 7/10"). Also a
    JSON reply (schema-constrained judges; read even when cut off) and the labelled form judges
    write instead ("Assistant 1: 8" / "Assistant 2: 9" at the start). Anything else -- a refusal,
    prose first, one number -- is unreadable: counted as an error, never averaged in.
    """
    if not text or not text.strip():
        return None
    one = re.search(r'"score_1"\s*:\s*' + _NUM, text)
    two = re.search(r'"score_2"\s*:\s*' + _NUM, text)
    if one and two:
        return _valid(float(one.group(1)), float(two.group(1)))
    lines = [line.strip().strip("*#").strip() for line in text.strip().splitlines() if line.strip()]
    labelled = dict((m.group(1), float(m.group(2))) for line in lines[:2] for m in _LABELLED.finditer(line))
    if set(labelled) == {"1", "2"}:
        return _valid(labelled["1"], labelled["2"])
    first = _OUT_OF.sub(" ", lines[0].replace("*", ""))
    if re.search(r"[A-Za-z]{3,}", re.sub(r"\b(?:and|vs|to|score|scores)\b", " ", first, flags=re.I)):
        return None  # prose on the first line: "I cannot rate these 2 answers" is not "2 answers"
    numbers = re.findall(_NUM, first)
    return _valid(float(numbers[0]), float(numbers[1])) if len(numbers) == 2 else None


def review_text(reply: str, scores: tuple[float, float] | None) -> str:
    """The review in the original's format (scores on the first line) when the reply was JSON."""
    if scores is None or not reply.lstrip().startswith("{"):
        return reply
    try:
        explanation = str(json.loads(reply).get("explanation", ""))
    except (json.JSONDecodeError, AttributeError):
        explanation = ""
    return f"{scores[0]:g} {scores[1]:g}\n{explanation}".rstrip()


# ---------------------------------------------------------------------------------------------
# 2023 review tables


def answer_models(answer_dir: Path) -> dict[str, str]:
    """answer_id -> model for every answer file in `answer_dir` (model_id, else the file's name)."""
    ids: dict[str, str] = {}
    files = sorted(Path(answer_dir).glob("*.jsonl")) if Path(answer_dir).is_dir() else []
    if not files:
        raise VicunaError(f"{answer_dir} holds no answer files (*.jsonl)", hint="pass the 2023 table/answer directory with --answers")
    for path in files:
        stem = path.stem.removeprefix("answer_")
        for row in read_jsonl(path):
            if "answer_id" in row:
                ids[str(row["answer_id"])] = str(row.get("model_id") or stem)
    return ids


_REVIEWER_SUFFIX = re.compile(r"-(?:default|general|generic|coding|math)$")


def from_review(row: dict[str, Any], where: str, models: dict[str, str] | None) -> dict[str, Any]:
    """A 2023 review as a scores record: answer ids mapped to models, the score pair read."""
    if models is None:
        raise VicunaError(f"{where}: a 2023 review names answers, not models", hint="pass the answer files' directory with --answers DIR")
    names = []
    for key in ("answer1_id", "answer2_id"):
        if str(row.get(key)) not in models:
            raise VicunaError(f"{where}: {key} {row.get(key)!r} is in no answer file", hint="--answers must hold the answer files these reviews were made on")
        names.append(models[str(row[key])])
    stored = row.get("score")
    pair = None
    if isinstance(stored, list) and len(stored) == 2 and all(isinstance(s, (int, float)) and s >= 0 for s in stored):
        pair = (float(stored[0]), float(stored[1]))
    elif "text" in row:  # FastChat stored [-1, -1] when its parser failed; read the text again
        pair = parse_scores(row.get("text"))
    reviewer_id = str(row.get("reviewer_id") or "gpt-4")
    record = {
        "question_id": row.get("question_id"), "model_1": names[0], "model_2": names[1],
        "score": list(pair) if pair else [-1, -1], "text": row.get("text", ""), "turn": 1,
        "judge": [_REVIEWER_SUFFIX.sub("", reviewer_id), reviewer_id], "review_id": row.get("review_id"),
    }
    return record if pair else {**record, "error": "the review's first line has no two scores"}


# ---------------------------------------------------------------------------------------------
# Tables: total scores, "B reaches N % of A", per category, win/tie/loss


def _orientation(rows: list[dict[str, Any]]) -> dict[frozenset, tuple[str, str]]:
    """Each pair's (A, B): as first judged in the named order (a --swap record shows B first)."""
    order: dict[frozenset, tuple[str, str]] = {}
    for row in sorted(rows, key=lambda r: bool(r.get("swapped"))):
        order.setdefault(frozenset((row["model_1"], row["model_2"])), (row["model_1"], row["model_2"]))
    return order


def scores_tables(rows: list[dict[str, Any]], category: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    order = _orientation(rows)
    blank = {"a_total": 0.0, "b_total": 0.0, "n": 0, "b_wins": 0, "ties": 0, "a_wins": 0, "errors": 0}
    pairs: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: dict(blank))
    cats: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(lambda: dict(blank))
    errors, first_shown = [], [0.0, 0]
    for row in rows:
        a, b = order[frozenset((row["model_1"], row["model_2"]))]
        tallies = (pairs[(a, b)], cats[(a, b, category(row))])
        s1, s2 = row["score"]
        if "error" in row or s1 < 0 or s2 < 0:
            errors.append({"question_id": row.get("question_id"), "model_1": row["model_1"], "model_2": row["model_2"],
                           "first_line": (str(row.get("text") or "").strip().splitlines() or [""])[0][:120]})
            for t in tallies:
                t["errors"] += 1
            continue
        sa, sb = (s1, s2) if row["model_1"] == a else (s2, s1)
        first_shown[0] += s1 - s2
        first_shown[1] += 1
        for t in tallies:
            t["a_total"] += sa
            t["b_total"] += sb
            t["n"] += 1
            t["b_wins" if sb > sa else "a_wins" if sa > sb else "ties"] += 1

    def ratio(t: dict[str, Any]) -> dict[str, Any]:
        return {**t, "ratio": t["b_total"] / t["a_total"] if t["a_total"] else None}

    return {
        "pairs": [{"a": a, "b": b, **ratio(t)} for (a, b), t in pairs.items()],
        "categories": [{"a": a, "b": b, "category": c, **ratio(t)} for (a, b, c), t in sorted(cats.items())],
        "errors": errors,
        "records": len(rows),
        # mean score advantage of the answer shown first (Assistant 1): the position bias --swap evens out
        "first_shown_advantage": first_shown[0] / first_shown[1] if first_shown[1] else None,
    }
