"""`stats`: what a conversation file holds — records, turns, characters, token lengths, languages.

The file is read as it is (no cleaning); token lengths (with a model) are of the conversation
rendered for training after role normalisation, the same count `clean` splits by.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


from .formats import Raw, Skip, to_sharegpt
from .pipeline import _STATE, OrderedPool, chunked, load_token_counter, open_inputs, worker_count
from .report import Progress, histogram, summarize
from .split import to_messages
from .steps import detect_language, normalise_roles
from .config import StatsConfig  # noqa: F401  (also imported from here)




def _describe(raw: Raw, fmt: str) -> tuple:
    try:
        record = to_sharegpt(raw, fmt)
    except Skip as skip:
        return ("skip", skip.reason)
    turns = record["conversations"]
    roles = Counter(t["from"] for t in turns)
    chars = sum(len(t["value"]) for t in turns)
    lang = detect_language(turns) if _STATE["languages"] else None
    tokens = None
    counter = _STATE["counter"]
    if counter is not None:
        normal = normalise_roles(turns, Counter())
        tokens = counter.count(to_messages(normal)) if len(normal) > 1 else 0
    return ("ok", roles, chars, lang, tokens)


def _stats_chunk(chunk: list) -> list[tuple]:
    return [_describe(raw, fmt) for raw, fmt in chunk]


def stats(config: StatsConfig) -> dict[str, Any]:
    counter = load_token_counter(config.model, config.template, trust_remote_code=config.trust_remote_code) if config.model else None
    inputs = open_inputs(config.inputs, config.input_format)
    skipped: Counter = Counter()
    roles: Counter = Counter()
    languages: Counter = Counter()
    turns: list[int] = []
    tokens: list[int] = []
    chars = 0
    try:
        total = None if any(i.size is None for i in inputs) else sum(i.size for i in inputs)
        state = {"counter": counter, "languages": config.languages}
        with OrderedPool(worker_count(config.workers), state) as pool, Progress("stats", total) as progress:
            for results in pool.map(_stats_chunk, chunked(inputs)):
                for row in results:
                    if row[0] == "skip":
                        skipped[row[1]] += 1
                        continue
                    _, record_roles, record_chars, lang, record_tokens = row
                    roles.update(record_roles)
                    turns.append(sum(record_roles.values()))
                    chars += record_chars
                    if lang:
                        languages[lang] += 1
                    if record_tokens is not None:
                        tokens.append(record_tokens)
                progress.update(sum(i.read_bytes for i in inputs), len(turns) + sum(skipped.values()))
        files = [{"path": i.name, "container": i.container, "format": i.format} for i in inputs]
    finally:
        for inp in inputs:
            inp.close()
    result: dict[str, Any] = {
        "inputs": files,
        "records": len(turns) + sum(skipped.values()),
        "conversations": len(turns),
        "skipped": dict(skipped.most_common()),
        "turns": {**summarize(turns), "by_role": dict(roles.most_common())},
        "characters": chars,
    }
    if counter is not None:
        result["tokens"] = {"template": counter.template.name, **summarize(tokens),
                            "histogram": histogram(tokens)}
    if config.languages:
        result["languages"] = dict(languages.most_common())
    return result
