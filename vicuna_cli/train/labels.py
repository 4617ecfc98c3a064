"""Which tokens carry loss (../shared/specs/masking.md): built from character spans over ONE
rendered string tokenized ONCE.

A token is supervised when its characters lie inside an assistant span (the message content plus
the end-of-turn marker that follows it, from `core.templates`). The one allowed overhang is
leading whitespace: LLaMA's SentencePiece puts the separator space of " ASSISTANT: Hello" into
"▁Hello", and that token is supervised. Any other disagreement between the rendered string and
the token offsets stops training with the sample id; a sample is never masked silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from ..core.encoding import template_writes_special_tokens
from ..core.errors import VicunaError
from ..core.templates import ChatTemplate, Template
from ..data.split import TokenCounter
from .dataset import Conversation

IGNORE = -100


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]  # unshifted: labels[t] is the target of the token at t (or -100)

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


class LabelBuilder:
    """Renders, tokenizes and masks conversations for one tokenizer + template."""

    def __init__(self, tokenizer: Any, template: Template | ChatTemplate, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise VicunaError(
                "training needs a fast tokenizer (tokenizer.json): label masks are built from token offsets",
                hint="convert the tokenizer with transformers (AutoTokenizer.from_pretrained(...).save_pretrained)",
            )
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.counter = TokenCounter(tokenizer, template)
        self.markers = sorted(self.counter.added_texts, key=len, reverse=True)

    def render(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        rendered = self.template.render(conversation.messages, add_generation_prompt=False)
        spans = list(rendered.assistant_spans)
        expected = sum(1 for m in conversation.messages if m["role"] == "assistant")
        if len(spans) != expected:
            raise VicunaError(
                f"sample {conversation.id}: template {self.template.name!r} renders {len(spans)} assistant "
                f"span(s) for {expected} assistant turn(s) with this tokenizer, so no loss could be placed",
                hint="pick a fixed template with --template (see `vicuna templates`)",
            )
        if template_writes_special_tokens(self.template):
            spans = [self._end_at_marker(rendered.text, span) for span in spans]
        return rendered.text, spans

    def _end_at_marker(self, text: str, span: tuple[int, int]) -> tuple[int, int]:
        """A chat template's span is everything an assistant turn appends, e.g. "Hi<|im_end|>\\n";
        the spec supervises content + end-of-turn marker, so it ends after the last special token."""
        start, end = span
        best = -1
        for marker in self.markers:
            at = text.rfind(marker, start, end)
            if at >= 0:
                best = max(best, at + len(marker))
        return (start, best) if best > start else span

    def build_many(self, conversations: Sequence[Conversation], notes: Counter) -> list[Sample]:
        rendered = [self.render(c) for c in conversations]
        encodings = self.counter.encode_batch([text for text, _ in rendered])
        samples = []
        for conversation, (text, spans), encoding in zip(conversations, rendered, encodings):
            sample = self.mask(conversation.id, text, spans, encoding.ids, encoding.offsets, notes)
            if sample is not None:
                samples.append(sample)
        return samples

    def build(self, conversation: Conversation, notes: Counter | None = None) -> Sample | None:
        samples = self.build_many([conversation], Counter() if notes is None else notes)
        return samples[0] if samples else None

    def mask(self, sample_id: str, text: str, spans: list[tuple[int, int]], ids: list[int],
             offsets: list[tuple[int, int]], notes: Counter) -> Sample | None:
        labels = [IGNORE] * len(ids)
        ends = [-1] * len(spans)  # index of the last token of each assistant turn
        covered = [bytearray(b - a) for a, b in spans]
        turn = 0
        for k, (s, e) in enumerate(offsets):  # offsets and spans both run left to right
            while turn < len(spans) and spans[turn][1] <= s:
                turn += 1
            if turn == len(spans):
                break
            a, b = spans[turn]
            if e <= a or e <= s:  # before the turn, or an empty span (BOS added by the tokenizer)
                continue
            if s < a and text[s:a].strip():
                raise _mismatch(sample_id, turn, f"token {text[s:e]!r} starts before the turn's first character")
            if e > b:
                raise _mismatch(sample_id, turn, f"token {text[s:e]!r} runs past the end-of-turn marker")
            labels[k] = ids[k]
            ends[turn] = k
            covered[turn][max(s, a) - a : e - a] = b"\x01" * (e - max(s, a))
        for turn, (a, b) in enumerate(spans):
            missing = [a + i for i, ok in enumerate(covered[turn]) if not ok and not text[a + i].isspace()]
            if missing:
                raise _mismatch(sample_id, turn, f"character {missing[0]} ({text[missing[0]]!r}) has no token")
        if len(ids) > self.max_length:
            fitting = [end for end in ends if 0 <= end < self.max_length]
            if not fitting:
                notes["no assistant turn ends within --max-length"] += 1
                return None
            notes["truncated at the end of an assistant turn"] += 1
            ids, labels = ids[: fitting[-1] + 1], labels[: fitting[-1] + 1]
        labels[0] = IGNORE  # nothing predicts the first token
        if not any(label != IGNORE for label in labels):
            notes["no supervised token"] += 1
            return None
        return Sample(sample_id, list(ids), labels)


def _mismatch(sample_id: str, turn: int, what: str) -> VicunaError:
    return VicunaError(
        f"sample {sample_id}: tokenization does not match the rendered text in assistant turn {turn + 1}: {what}",
        hint="this template and tokenizer do not agree on turn boundaries; inspect it with "
        "`vicuna train inspect-data` or pick another --template",
    )
