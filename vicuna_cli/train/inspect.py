"""`vicuna train inspect-data`: one sample token by token with its label, the way training sees it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..core.errors import VicunaError
from ..core.templates import template_for_model
from .dataset import read_conversations
from .labels import IGNORE, LabelBuilder


@dataclass
class TokenRow:
    index: int
    token_id: int
    text: str  # the characters the token covers in the rendered string
    piece: str  # the tokenizer's own name for it ("▁Hello", "<0x0A>", ...)
    label: int  # -100 or the id the model must predict at this position


@dataclass
class Inspection:
    sample_id: str
    template: str
    rows: list[TokenRow]
    notes: dict[str, int]

    @property
    def supervised(self) -> int:
        return sum(1 for row in self.rows if row.label != IGNORE)


def inspect_sample(model: str | None, data: list[str], which: str, template: str | None, max_length: int,
                   *, trust_remote_code: bool = False) -> Inspection:
    from transformers import AutoTokenizer

    from ..core import models

    resolved = models.resolve(model)
    with models._quiet_transformers():
        tokenizer = models.load_pretrained(AutoTokenizer, resolved.path, trust_remote_code=trust_remote_code)
    skipped: Counter = Counter()
    conversations = read_conversations(data, skipped)
    if not conversations:
        raise VicunaError("no usable conversation in the data", hint=f"skipped: {dict(skipped)}")
    chosen = _pick(conversations, which)
    builder = LabelBuilder(tokenizer, template_for_model(tokenizer, template or resolved.template), max_length)
    text, spans = builder.render(chosen)
    encoding = builder.counter.encode(text)
    notes: Counter = Counter()
    sample = builder.mask(chosen.id, text, spans, encoding.ids, encoding.offsets, notes)
    labels = sample.labels if sample is not None else []
    rows = [TokenRow(k, token_id, text[s:e], tokenizer.convert_ids_to_tokens(token_id),
                     labels[k] if k < len(labels) else IGNORE)
            for k, (token_id, (s, e)) in enumerate(zip(encoding.ids, encoding.offsets))]
    if sample is not None:
        rows = rows[: len(sample)]
    return Inspection(chosen.id, builder.template.name, rows, dict(notes))


def _pick(conversations: list[Any], which: str) -> Any:
    for conversation in conversations:
        if conversation.id == which:
            return conversation
    if which.isdigit() and int(which) < len(conversations):
        return conversations[int(which)]
    raise VicunaError(
        f"no sample {which!r}: give a sample id or an index below {len(conversations)}",
        hint="first ids: " + ", ".join(c.id for c in conversations[:5]),
    )
