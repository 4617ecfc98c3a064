"""Reading verdicts out of judge replies.

The judge is asked for JSON that follows a schema (sent as `response_format` when the endpoint
takes it) and, in the prompt, to end with a bracketed marker. Replies in the wild mix both, wrap
JSON in code fences, restate the instructions ("use [[A]], [[B]] or [[C]]") before deciding, bold
the marker, or answer in another language. The parser therefore tries, in order:

1. a JSON object (the whole reply, a fenced block, or the last {...} in the text);
2. bracketed markers: `[[A]]` / `[[B]]` / `[[C]]` (also `[[Assistant A]]`, `[[tie]]`, and the
   Arena-Hard forms `[[A>B]]`, `[[A>>B]]`, `[[A=B]]`), or `[[8]]`, `[[8.5]]`, `[[8/10]]`; a list of
   the options ("[[A]], [[B]] or [[C]]") is an echo of the instructions, not a verdict, and the last
   remaining marker wins (judges reason first and decide at the end);
3. for ratings, the single-bracket form `[8]` and "Rating: 8/10" style text.
Anything else is unparseable (None): the caller retries, then records an error.
"""

from __future__ import annotations

import json
import re
from typing import Any

PAIR_SCHEMA: dict[str, Any] = {
    "name": "pairwise_verdict",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "explanation": {"type": "string"},
            "verdict": {"type": "string", "enum": ["A", "B", "tie"]},
        },
        "required": ["explanation", "verdict"],
        "additionalProperties": False,
    },
}
SINGLE_SCHEMA: dict[str, Any] = {
    "name": "single_rating",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "explanation": {"type": "string"},
            "rating": {"type": "number", "minimum": 1, "maximum": 10},
        },
        "required": ["explanation", "rating"],
        "additionalProperties": False,
    },
}

_FENCE = re.compile(r"```(?:json|JSON)?\s*(\{.*?\})\s*```", re.S)
_VERDICT_KEYS = ("verdict", "winner", "better", "better_answer", "choice", "result", "decision", "preferred")
_RATING_KEYS = ("rating", "score", "grade")

_PAIR_WORDS = {
    "a": "A", "assistant a": "A", "answer a": "A", "model a": "A",
    "b": "B", "assistant b": "B", "answer b": "B", "model b": "B",
    "c": "tie", "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie", "neither": "tie",
    "a>>b": "A", "a>b": "A", "b<a": "A", "b<<a": "A",
    "b>>a": "B", "b>a": "B", "a<b": "B", "a<<b": "B",
    "a=b": "tie", "b=a": "tie",
}
# [[ A ]], [[Assistant A]], [[A>>B]], [[tie]] (also with ** bold ** inside)
_PAIR_MARK = re.compile(r"\[\[\s*\**\s*([A-Za-z][A-Za-z ]{0,20}?|[AB]\s*(?:>>|>|=|<|<<)\s*[AB])\s*\**\s*\]\]")
# Two or more markers joined by "or", ",", "/", "and" (any language's words up to 12 chars): an echo.
_ECHO = re.compile(r"\[\[[^\[\]]{1,24}\]\](?:[\s,;/]*(?:or|and|oder|ou|o|或|或者|или|и|y|et|und|、)?[\s,;/\"'“”]*\[\[[^\[\]]{1,24}\]\])+", re.I)
_PLAIN_VERDICT = re.compile(
    r"(?:final\s+)?verdict\s*(?:is)?\s*[:：]?\s*\**\s*\"?(?:assistant\s+)?([AB]|tie|C)\b\"?", re.I
)

_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE_DOUBLE = re.compile(r"\[\[\s*\**\s*" + _NUMBER + r"\s*(?:/\s*10(?:\.0)?)?\s*\**\s*\]\]")
_SCORE_SINGLE = re.compile(r"(?<!\[)\[\s*" + _NUMBER + r"\s*(?:/\s*10)?\s*\](?!\])")
_SCORE_TEXT = re.compile(
    r"(?:rating|score|grade|note|bewertung|puntuaci[oó]n|calificaci[oó]n|评分|得分|評価|оценка)\s*\**\s*(?:[:：=]|of|is)?\s*\**\s*"
    + _NUMBER + r"\s*(?:/\s*10|out of 10)?",
    re.I,
)
_SCORE_OUT_OF = re.compile(_NUMBER + r"\s*(?:/|out of)\s*10\b")


def _json_objects(text: str) -> list[dict[str, Any]]:
    """JSON objects in `text`: the whole text, fenced blocks, then balanced {...} spans."""
    found: list[dict[str, Any]] = []
    candidates = [text.strip()] + _FENCE.findall(text)
    depth, start = 0, -1
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                candidates.append(text[start : i + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def _pair_word(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    word = re.sub(r"[\s\[\]\*\"'.]+", " ", value).strip().lower()
    word = word.replace(" ", "") if re.fullmatch(r"[ab]\s*[<>=]+\s*[ab]", word) else word
    return _PAIR_WORDS.get(word)


def _strip_echoes(text: str) -> str:
    return _ECHO.sub(" ", text)


def parse_pair(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from a pairwise judge reply, or None when there is no verdict."""
    if not text:
        return None
    for obj in reversed(_json_objects(text)):
        for key in _VERDICT_KEYS:
            if key in obj and (verdict := _pair_word(obj[key])):
                return verdict
    marks = [m for m in _PAIR_MARK.findall(_strip_echoes(text)) if _pair_word(m)]
    if marks:
        return _pair_word(marks[-1])
    plain = _PLAIN_VERDICT.findall(_strip_echoes(text))
    if plain:
        return _pair_word(plain[-1])
    return None


def _rating(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + r"\s*(?:/\s*10)?\s*", value)
        value = float(m.group(1)) if m else None
    if isinstance(value, (int, float)) and 1 <= value <= 10:
        return float(value)
    return None


def parse_single(text: str | None) -> float | None:
    """A 1-10 rating from a single-answer judge reply, or None."""
    if not text:
        return None
    for obj in reversed(_json_objects(text)):
        for key in _RATING_KEYS:
            if key in obj and (score := _rating(obj[key])) is not None:
                return score
    body = _strip_echoes(text)
    for pattern in (_SCORE_DOUBLE, _SCORE_SINGLE, _SCORE_TEXT, _SCORE_OUT_OF):
        scores = [s for s in (_rating(m) for m in pattern.findall(body)) if s is not None]
        if scores:
            return scores[-1]
    return None


def parse(kind: str, text: str | None) -> str | float | None:
    return parse_pair(text) if kind == "pair" else parse_single(text)
