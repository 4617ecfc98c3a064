"""Split long conversations on exchange boundaries so each piece fits `max_length` tokens.

Lengths are those training sees: the conversation rendered with the model's template
(`core.templates`) and tokenized with the model's own tokenizer, special tokens included. A
piece never cuts a turn: it is a run of whole user/assistant exchanges (with the system turn,
if any, repeated at its start); an exchange that cannot fit on its own is dropped and counted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Sequence

from ..core.encoding import add_special_tokens
from ..core.templates import ChatTemplate, Template

ROLE_TO_OPENAI = {"system": "system", "human": "user", "gpt": "assistant"}


class TokenCounter:
    """Token length of a rendered conversation, the way training will tokenize it."""

    def __init__(self, tokenizer: Any, template: Template | ChatTemplate, backend: Any = None):
        """`backend`: the `tokenizers.Tokenizer` behind `tokenizer`, if it does not expose one
        as `backend_tokenizer`; it gives batched encoding and token offsets."""
        self.tokenizer, self.template = tokenizer, template
        # The BOS rule of chat and serve, from its one place (core/encoding.py).
        self.add_special_tokens = add_special_tokens(template)
        if backend is None and getattr(tokenizer, "is_fast", False):
            backend = tokenizer.backend_tokenizer
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        self._backend = backend
        # Added tokens (</s>, <|im_start|>, ...): the tokenizer never merges across them.
        added = backend.get_added_tokens_decoder().values() if backend is not None else ()
        self.added_texts = {token.content for token in added}

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """`template.render(messages, add_generation_prompt=False).text`, without computing the
        assistant spans (for a chat template those cost one extra Jinja render per turn)."""
        if isinstance(self.template, ChatTemplate):
            return self.template.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
        return self.template.render(messages, add_generation_prompt=False).text

    def count_text(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> Any:
        """Something with len() = the token count and, with a fast tokenizer, `.offsets`."""
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=self.add_special_tokens)
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[Any]:
        """One call for many texts (less per-call overhead than one call each)."""
        if self._backend is not None:
            return self._backend.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [self.encode(text) for text in texts]

    def count(self, messages: Sequence[dict[str, str]]) -> int:
        return self.count_text(self.render(messages))


def to_messages(turns: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": ROLE_TO_OPENAI[t["from"]], "content": t["value"]} for t in turns]


def alternates(turns: Sequence[dict[str, str]]) -> bool:
    body = turns[1:] if turns and turns[0]["from"] == "system" else turns
    return len(body) % 2 == 0 and all(t["from"] == ("human", "gpt")[i % 2] for i, t in enumerate(body))


def flat(pairs: Sequence[list[dict[str, str]]]) -> list[dict[str, str]]:
    return [m for pair in pairs for m in pair]


class Splitter:
    # How far an estimate may be off before the next exchange is not even tried.
    MARGIN = 16

    def __init__(self, counter: TokenCounter, max_length: int, split: bool = True):
        self.counter, self.max_length, self.enabled = counter, max_length, split

    def measure(self, records: list[dict[str, Any]]) -> list[tuple[str, Any] | None]:
        """(rendered text, encoding) of each record; None where the turns do not alternate."""
        texts = [self.counter.render(to_messages(r["conversations"])) if alternates(r["conversations"]) else None
                 for r in records]
        encodings = iter(self.counter.encode_batch([t for t in texts if t is not None]))
        return [None if text is None else (text, next(encodings)) for text in texts]

    def split(self, record: dict[str, Any], notes: Counter, measured: tuple[str, Any] | None = None
              ) -> tuple[list[dict[str, Any]], list[int], str]:
        """(pieces, their token lengths, why there are none)."""
        turns = record["conversations"]
        if measured is None and alternates(turns):
            measured = self.measure([record])[0]
        if measured is None:
            return [], [], "turns do not alternate user/assistant (run without --no-roles)"
        text, encoding = measured
        if len(encoding) <= self.max_length or not self.enabled:
            return [record], [len(encoding)], ""
        system = turns[:1] if turns[0]["from"] == "system" else []
        body = turns[len(system):]
        conversation = _Exchanges(self.counter, to_messages(system),
                                  [to_messages(body[i:i + 2]) for i in range(0, len(body), 2)], text, encoding)
        pieces, lengths = [], []
        for start, end, length in self._chunks(conversation, notes):
            piece = {k: v for k, v in record.items() if k != "conversations"}
            piece["id"] = f"{record['id']}_{len(system) + 2 * start}"
            piece["conversations"] = system + body[2 * start:2 * end]
            pieces.append(piece)
            lengths.append(length)
        notes["split:conversations split"] += 1
        return pieces, lengths, f"no exchange fits in {self.max_length} tokens"

    def _chunks(self, conversation: "_Exchanges", notes: Counter):
        """Greedy maximal runs of exchanges, each one counted exactly.

        The estimate picks where a run ends; the run is then counted exactly and moved back, or
        forward while the next exchange may fit, so every piece fits and none could take more.
        """
        count, deltas, limit, start = conversation.count, conversation.deltas, self.max_length, 0
        while start < len(deltas):
            first = count(start, start + 1)
            if first > limit:
                notes["split:exchanges longer than max-length dropped"] += 1
                start += 1
                continue
            end, estimate = start + 1, first
            while end < len(deltas) and estimate + deltas[end] <= limit:
                estimate += deltas[end]
                end += 1
            length = count(start, end)
            while length > limit:
                end -= 1
                length = count(start, end)
            while end < len(deltas) and length + deltas[end] <= limit + self.MARGIN:
                longer = count(start, end + 1)
                if longer > limit:
                    break
                end, length = end + 1, longer
            yield start, end, length
            start = end


class _Exchanges:
    """One long conversation: exact token counts of runs of its exchanges, mostly read off the
    one encoding of the whole conversation instead of tokenizing each run again.

    A run [s, e) usually renders as (exchange s rendered alone) + R, where R is a stretch of
    the whole rendering. The tokenizer cuts its input at added tokens (</s>, <|im_start|>, ...)
    and encodes the pieces between them independently, so when an added token starts or ends
    exactly at both ends of R in the whole rendering, count(run) = count(exchange s alone) + the
    whole encoding's tokens inside R — exactly. When that cannot be shown (no offsets, no added
    token at a cut, a template that renders a run differently), the run is tokenized itself.
    """

    def __init__(self, counter: TokenCounter, head: list, pairs: list, text: str, encoding: Any):
        self.counter, self.head, self.pairs, self.text = counter, head, pairs, text
        self._alone: dict[int, tuple[str, int]] = {}
        # A fast tokenizer's encoding maps characters to tokens (no Python lists of offsets).
        self.encoding = encoding if hasattr(encoding, "char_to_token") else None
        if self.encoding is not None:
            # Estimates: the tokens from one user message to the next belong to one exchange.
            at, bounds = 0, []
            for pair in pairs:
                at = text.find(pair[0]["content"], at)
                if at < 0:
                    break
                bounds.append(at)
            if len(bounds) == len(pairs):
                before = [self._tokens_before(b) for b in bounds] + [self._tokens_before(len(text))]
                self.deltas = [b - a for a, b in zip(before, before[1:])]
                return
            self.encoding = None
        alone = [self._single(i)[1] for i in range(len(pairs))]  # each exchange less the fixed part
        fixed = max(0, alone[0] + alone[1] - self._encode(0, 2)) if len(pairs) > 1 else 0
        self.deltas = [n - fixed for n in alone]

    def count(self, start: int, end: int) -> int:
        if end == start + 1:
            return self._single(start)[1]
        single, n = self._single(start)
        text = self.counter.render(self.head + flat(self.pairs[start:end]))
        if self.encoding is not None and text.startswith(single):
            rest = text[len(single):]
            x = self.text.find(rest)
            y = x + len(rest)
            # The same text on both sides of the cut as in the run (added-token matching and
            # pre-tokenizing look only at nearby characters), and an added token at both ends.
            if x >= 0 and self.text[:x].endswith(single[-64:]) and self._is_cut(x) and self._is_cut(y):
                return n + self._tokens_before(y) - self._tokens_before(x)
        return self.counter.count_text(text)

    def _tokens_before(self, p: int) -> int:
        """Tokens of the whole encoding that start before character `p` (a token start or the end)."""
        if p >= len(self.text):
            last = self.encoding.char_to_token(len(self.text) - 1)
            return len(self.encoding) if last is None else last + 1
        k = self.encoding.char_to_token(p)
        return len(self.encoding) if k is None else k

    def _is_cut(self, p: int) -> bool:
        """Whether an added token starts or ends exactly at character `p` of the whole text."""
        if p >= len(self.text):
            return True
        k = self.encoding.char_to_token(p)
        if k is None or self.encoding.token_to_chars(k)[0] != p:
            return False
        added = self.counter.added_texts
        start, stop = self.encoding.token_to_chars(k)
        if self.text[start:stop] in added:
            return True
        if k == 0 or self.encoding.token_to_chars(k - 1) is None:
            return False
        start, stop = self.encoding.token_to_chars(k - 1)
        return stop == p and self.text[start:stop] in added

    def _single(self, i: int) -> tuple[str, int]:
        if i not in self._alone:
            text = self.counter.render(self.head + self.pairs[i])
            self._alone[i] = (text, self.counter.count_text(text))
        return self._alone[i]

    def _encode(self, start: int, end: int) -> int:
        return self.counter.count(self.head + flat(self.pairs[start:end]))
