"""Training conversations from files: ShareGPT, OpenAI messages, Alpaca, GPT4All or OASST1, read with the same
readers as `vicuna data clean` (`data/formats.py`), as (id, OpenAI-style messages) pairs."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..core.errors import VicunaError
from ..data.formats import InputFile, Skip, to_sharegpt
from ..data.split import alternates, to_messages


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[dict[str, str]]


def read_conversations(paths: Sequence[str], skipped: Counter, oasst_paths: str = "best") -> list[Conversation]:
    """Every usable conversation of `paths`, in file order; unusable records are counted in
    `skipped` by reason (a leading assistant turn and a trailing user turn are trimmed, as in
    FastChat: they carry nothing to learn)."""
    conversations: list[Conversation] = []
    seen: Counter = Counter()
    for path in paths:
        source = InputFile(path)
        try:
            for raw in source.conversation_records(oasst_paths):
                try:
                    record = to_sharegpt(raw, source.format)
                except Skip as exc:
                    skipped[exc.reason] += 1
                    continue
                turns = record["conversations"]
                system = turns[:1] if turns and turns[0]["from"] == "system" else []
                body = turns[len(system):]
                while body and body[0]["from"] != "human":
                    body = body[1:]
                if body and body[-1]["from"] == "human":
                    body = body[:-1]
                if not body:
                    skipped["no assistant turn"] += 1
                    continue
                if not alternates(system + body):
                    skipped["turns do not alternate user/assistant"] += 1
                    continue
                # Ids name samples in error messages: keep them unique across files.
                cid = record["id"]
                seen[cid] += 1
                if seen[cid] > 1:
                    cid = f"{cid}#{seen[cid]}"
                conversations.append(Conversation(cid, to_messages(system + body)))
        finally:
            source.close()
    return conversations


def split_eval(conversations: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` held out for eval (at least one conversation)."""
    if not fraction:
        return conversations, []
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(conversations) * fraction))
    if n_eval >= len(conversations):
        raise VicunaError(
            f"--eval-split {fraction} leaves no training data ({len(conversations)} conversations)",
            hint="use a smaller --eval-split or pass --eval-data",
        )
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]
