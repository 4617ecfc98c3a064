"""The per-conversation cleaning steps, in pipeline order, and what each one counts.

Each worker process runs `process` on a chunk of raw records; de-duplication needs to see every
record in order, so the worker only computes the keys and the parent decides (pipeline.py).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import VicunaError
from .formats import Raw, Skip, to_sharegpt
from .html import html_to_markdown

# Pipeline order; the report lists the steps in this order.
STEPS = ("read", "html", "empty", "roles", "length", "blocklist", "lang", "dedup", "split")

# The original ShareGPT cleaning (FastChat clean_sharegpt.py) dropped every conversation that
# mentions the source chatbot by name, and rate-limit answers. Opt-in: --blocklist-preset original.
BLOCKLIST_PRESETS = {
    "original": ("openai", "chatgpt", "Too many requests in 1 hour. Try again later."),
}


@dataclass(frozen=True)
class StepOptions:
    """Everything a worker needs besides the tokenizer; picklable."""

    html: bool = True
    empty: bool = True
    roles: bool = True
    min_turns: int = 1  # assistant turns
    min_chars: int = 16
    blocklist: tuple[str, ...] = ()
    langs: tuple[str, ...] = ()
    dedup: bool = True


@dataclass
class Result:
    """What became of one input record."""

    dropped: str | None = None  # the step that dropped it
    reason: str | None = None
    notes: Counter = field(default_factory=Counter)  # "step:event" -> count
    id: str | None = None
    key: bytes | None = None  # digest of the normalised first exchange
    pieces: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens (with a model) or characters, per piece
    lang: str | None = None
    where: str = ""  # "FILE record N (line L)", for records of the wrong shape


def process_chunk(chunk: list[tuple[Raw, str]], opts: StepOptions, splitter: Any = None) -> list[Result]:
    """`process` each record, then measure the survivors with one batched tokenizer call and
    split the ones that are too long."""
    results = [process(raw, input_format, opts) for raw, input_format in chunk]
    if splitter is not None:
        kept = [r for r in results if r.dropped is None]
        for result, measured in zip(kept, splitter.measure([r.pieces[0] for r in kept])):
            result.pieces, result.lengths, reason = splitter.split(result.pieces[0], result.notes, measured)
            if not result.pieces:
                _drop(result, "split", reason)
    return results


def process(raw: Raw, input_format: str, opts: StepOptions) -> Result:
    result = Result()
    try:
        record = to_sharegpt(raw, input_format)
    except Skip as skip:
        result.where = f"{raw.source} record {raw.index + 1}" + (f" (line {raw.line})" if raw.line else "")
        return _drop(result, "read", skip.reason)
    result.id = record["id"]
    turns = record["conversations"]
    if opts.html:
        converted = [html_to_markdown(t["value"]) for t in turns]
        changed = sum(new != t["value"] for new, t in zip(converted, turns))
        if changed:
            result.notes["html:turns changed"] += changed
            turns = [{"from": t["from"], "value": v} for t, v in zip(turns, converted)]
    if opts.empty:
        kept = [t for t in turns if t["value"].strip()]
        if len(kept) != len(turns):
            result.notes["empty:turns removed"] += len(turns) - len(kept)
            turns = kept
    if opts.roles:
        turns = normalise_roles(turns, result.notes)
    reason = too_short(turns, opts.min_turns, opts.min_chars)
    if reason:
        return _drop(result, "length", reason)
    if opts.blocklist:
        phrase = blocked_phrase(turns, opts.blocklist)
        if phrase:
            return _drop(result, "blocklist", f"mentions {phrase!r}")
    if opts.langs:
        result.lang = detect_language(turns)
        if result.lang not in opts.langs:
            return _drop(result, "lang", f"language {result.lang}")
    record["conversations"] = turns
    if opts.dedup:
        # The paths of one OASST1 tree share their first exchange by construction: key them whole.
        result.key = first_exchange_key(turns) if input_format != "oasst1" else conversation_key(turns)
    result.pieces, result.lengths = [record], [sum(len(t["value"]) for t in turns)]
    return result


def _drop(result: Result, step: str, reason: str) -> Result:
    result.dropped, result.reason = step, reason
    return result


def normalise_roles(turns: list[dict[str, str]], notes: Counter) -> list[dict[str, str]]:
    """Keep a leading system turn; then user/assistant alternation starting with the user:
    consecutive same-role turns are merged, a leading assistant turn and a trailing user turn
    (a question without an answer) are dropped."""
    system: list[dict[str, str]] = []
    out: list[dict[str, str]] = []
    for turn in turns:
        role = turn["from"]
        if role == "system":
            if not out and not system:
                system = [turn]
            else:
                notes["roles:late system turns dropped"] += 1
        elif not out and role == "gpt":
            notes["roles:leading assistant turns dropped"] += 1
        elif out and out[-1]["from"] == role:
            out[-1] = {"from": role, "value": out[-1]["value"] + "\n\n" + turn["value"]}
            notes["roles:turns merged"] += 1
        else:
            out.append(turn)
    if out and out[-1]["from"] == "human":
        out.pop()
        notes["roles:trailing user turns dropped"] += 1
    return system + out


def too_short(turns: list[dict[str, str]], min_turns: int, min_chars: int) -> str | None:
    answers = sum(t["from"] == "gpt" for t in turns)
    if answers < max(min_turns, 1 if min_chars else 0):
        return f"fewer than {max(min_turns, 1)} assistant turn{'s' if min_turns > 1 else ''}"
    if sum(len(t["value"]) for t in turns if t["from"] != "system") < min_chars:
        return f"fewer than {min_chars} characters"
    return None


def load_blocklist(files: list[Path], preset: str | None) -> tuple[str, ...]:
    """Phrases from --blocklist files (one a line, '#' comments) and an optional preset."""
    phrases: list[str] = []
    if preset:
        if preset not in BLOCKLIST_PRESETS:
            from ..core.errors import unknown_choice

            raise unknown_choice("blocklist preset", preset, list(BLOCKLIST_PRESETS))
        phrases += BLOCKLIST_PRESETS[preset]
    for path in files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise VicunaError(f"--blocklist {path}: {exc.strerror or exc}") from None
        phrases += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(dict.fromkeys(p.lower() for p in phrases))


def blocked_phrase(turns: list[dict[str, str]], phrases: tuple[str, ...]) -> str | None:
    """The first listed phrase found in any turn, case-insensitively (phrases are lowercase).
    Substring search on the lowercased text: ~10x faster here than one IGNORECASE regex."""
    for turn in turns:
        text = turn["value"].lower()
        for phrase in phrases:
            if phrase in text:
                return phrase
    return None


_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|<[^>]*>", re.S)
_LANG_SAMPLE = 600


def language_sample(turns: list[dict[str, str]]) -> str:
    """Prose from the start of the conversation: code and HTML tags say nothing about the language."""
    text = "\n".join(t["value"] for t in turns if t["from"] != "system")
    return _CODE.sub(" ", text[: _LANG_SAMPLE * 4])[:_LANG_SAMPLE]


def detect_language(turns: list[dict[str, str]]) -> str:
    """ISO 639-1 code from py3langid, whose model ships inside the wheel (no download)."""
    from py3langid.langid import classify

    sample = language_sample(turns)
    return classify(sample)[0] if sample.strip() else "und"


_SPACES = re.compile(r"\s+")


def first_exchange_key(turns: list[dict[str, str]]) -> bytes | None:
    """Digest of the first user message and first answer, case- and whitespace-insensitive."""
    first = {}
    for turn in turns:
        first.setdefault(turn["from"], turn["value"])
    if "human" not in first or "gpt" not in first:
        return None
    return text_key([first["human"], first["gpt"]])


def conversation_key(turns: list[dict[str, str]]) -> bytes:
    return text_key([f"{t['from']}:{t['value']}" for t in turns])


def text_key(parts: list[str]) -> bytes:
    """Digest of `parts`, case- and whitespace-insensitive (the dedup keys of data clean and pairs)."""
    text = _SPACES.sub(" ", "\x00".join(parts).casefold()).strip()
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def known_languages() -> list[str]:
    """The codes the language identifier can return (its model loads once per process)."""
    from py3langid.langid import _get_identifier

    return sorted(_get_identifier().nb_classes)
