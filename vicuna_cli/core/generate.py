"""The generation engine: streaming text from a local model. Chat, serve and judge all use it.

There is one engine: `batch.BatchEngine` (continuous batching: requests join and leave a running
batch between decode steps). `Engine.generate` — what `vicuna chat` uses — is a batch of one over
the same step machinery, run in the caller's thread. This module holds the parts both share
(parameters, events, stats, detokenizing, stop strings). One call = one `Generation`, an
iterator of text deltas that
  - samples with temperature / top-p / top-k / repetition, presence and frequency penalties
    (`sampling.py`, the same maths as transformers' logits processors and OpenAI's penalty
    formula), reproducibly with `seed` (a private generator per request);
  - stops at EOS tokens and at stop strings, which never reach the output, even when a stop
    string arrives split over several tokens (text that could be the start of one is held back);
  - detokenizes incrementally without ever emitting half a UTF-8 character;
  - can be cancelled between tokens (`cancel()`, an Event, or closing the iterator);
  - records stats: prompt/output tokens, time to first token, tokens/s, finish reason.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from .errors import VicunaError


MAX_TOP_LOGPROBS = 20


class InvalidParams(VicunaError):
    """A sampling parameter out of range; `param` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", hint=f"fix the {param} value and try again")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # <= 1e-5 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # transformers' (CTRL) penalty over prompt + output
    max_new_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens: -presence if seen
    frequency_penalty: float = 0.0  # ... and -frequency * count
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS tokens
    logprobs: bool = False  # report the chosen token's logprob ...
    top_logprobs: int = 0  # ... and this many alternatives (0-20)
    grammar: Any = None  # a structured.Grammar (a compiled response_format): constrains every token

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self.validate()

    def validate(self) -> None:
        def number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidParams(name, f"must be a number, got {value!r}")
            if value < low or value > high or (low_open and value == low):
                bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
                raise InvalidParams(name, f"must be in {bounds}, got {value!r}")

        def integer(name: str, value: Any, low: int, high: float) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidParams(name, f"must be an integer, got {value!r}")
            if not low <= value <= high:
                raise InvalidParams(name, f"must be between {low} and {high:g}, got {value}")

        number("temperature", self.temperature, 0.0, 100.0)
        number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        integer("top_k", self.top_k, 0, math.inf)
        number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        integer("max_new_tokens", self.max_new_tokens, 1, math.inf)
        if self.seed is not None:
            integer("seed", self.seed, -(2**63), 2**64 - 1)
        integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidParams("top_logprobs", "needs logprobs to be on")
        for s in self.stop:
            if not isinstance(s, str):
                raise InvalidParams("stop", f"must be strings, got {s!r}")
        for t in self.stop_token_ids:
            integer("stop_token_ids", t, 0, math.inf)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float | None = None  # seconds, from the call (or submit) to the first token
    total_time: float = 0.0
    finish_reason: str = ""  # stop | length | cancelled | error
    queue_time: float | None = None  # batch engine: seconds waiting for a slot, before the prefill
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache

    @property
    def completion_tokens(self) -> int:  # OpenAI's name
        return self.output_tokens

    @property
    def ttft(self) -> float | None:
        return self.time_to_first_token

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        if self.output_tokens < 2 or self.time_to_first_token is None:
            return 0.0
        return (self.output_tokens - 1) / max(self.total_time - self.time_to_first_token, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2)}


@dataclass
class TokenLogprob:
    """One token's log-probability (OpenAI's logprobs.content item); `top_logprobs` holds the
    most likely alternatives at that position (their own `top_logprobs` are empty)."""

    token_id: int
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class TokenEvent:
    """What a request streams: a text delta (whole characters, stop strings held back) and the
    token ids it came from; the last event of a request has a finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # None | stop | length | cancelled | error
    error: str | None = None  # the message when finish_reason == "error"


class ContextOverflow(VicunaError):
    """The prompt leaves no room to generate; callers that own a history can trim and retry."""

    def __init__(self, prompt_tokens: int, context_length: int, reserve: int = 1):
        room = f", {reserve} of them kept for the answer" if reserve > 1 else ""
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the model's context holds {context_length}{room}",
            hint="shorten the input (chat trims old turns itself; a single message must fit)",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class EmptyPrompt(VicunaError):
    """Nothing to generate from (serve answers it with its own error code)."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty", hint="send at least one token of prompt")


def check_prompt(prompt_ids: Sequence[int], context_length: int) -> None:
    """The one context check: chat, serve and the engines raise these two errors and no others."""
    if len(prompt_ids) == 0:
        raise EmptyPrompt()
    if len(prompt_ids) >= context_length:
        raise ContextOverflow(len(prompt_ids), context_length)


# ---------------------------------------------------------------------------------------------
# Text-side helpers (no torch): incremental detokenizing and stop strings


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    Decodes a small sliding window of ids twice (with and without the newest ones) and emits the
    difference, so tokenizers that drop a leading space when decoding from the middle of a text
    (SentencePiece) still give the right spacing. A window whose text ends in U+FFFD is an
    incomplete UTF-8 sequence (byte-fallback or byte-level BPE): wait for the next token.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # A few prompt tokens give the window a left context, so the first delta is spaced right.
        self.ids: list[int] = list(context_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is left at the end, minus a trailing incomplete character."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        return new_text[len(prefix_text) :].rstrip("\ufffd")


class StopStringFilter:
    """Passes text through, cutting at the first stop string and holding back possible starts."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = self._partial_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest end of `pending` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TokenPieces:
    """The text and raw bytes of single tokens, for logprobs (OpenAI's `token` and `bytes`).

    Decoding one id alone loses SentencePiece's leading space and turns a partial UTF-8 byte
    into U+FFFD, so bytes come from the vocabulary piece: `<0xNN>` byte-fallback pieces, the
    byte-level alphabet of GPT-2-style tokenizers, or the piece with "▁" as a space.
    """

    _BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        backend = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and "ByteLevel" in repr(backend.decoder)
        self.byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.convert_ids_to_tokens([token_id])[0] or ""
            match = self._BYTE_PIECE.fullmatch(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif self.byte_level and all(c in self.byte_decoder for c in piece):
                raw = bytes(self.byte_decoder[c] for c in piece)
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------
# The engine


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class Engine:
    """Streaming generation over one loaded causal LM, one request at a time in the caller's
    thread: a batch of one over `batch.BatchEngine`'s step machinery (serve batches many)."""

    def __init__(self, model: Any, tokenizer: Any, context_length: int | None = None, threads: int | None = None):
        from .batch import BatchEngine

        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        # One slot, stepped in the caller's thread; the queue is what it always was (256): a
        # generation submits when its iteration starts, so only interleaved iterations wait there.
        self.batch = BatchEngine(model, tokenizer, self.context_length, max_batch_size=1, max_queue=256, threads=threads)

    @property
    def stop_token_ids(self) -> set[int]:
        return self.batch.stop_token_ids

    @stop_token_ids.setter
    def stop_token_ids(self, value: set[int]) -> None:
        self.batch.stop_token_ids = set(value)

    @property
    def device(self) -> Any:
        return self.batch.device

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        cancel: threading.Event | None = None,
    ) -> "Generation":
        check_prompt(prompt_ids, self.context_length)
        return Generation(self, list(prompt_ids), params, cancel or threading.Event())


@dataclass
class Generation:
    engine: Engine
    prompt_ids: list[int]
    params: SamplingParams
    cancel_event: threading.Event
    stats: GenerationStats = field(default_factory=GenerationStats)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        batch = self.engine.batch
        request = batch.submit(self.prompt_ids, self.params)
        self.stats = request.stats
        finished = False
        try:
            while not finished:
                if self.cancel_event.is_set():
                    request.cancel()
                batch.step()
                for event in request.drain():
                    self.output_ids.extend(event.token_ids)
                    self.logprobs.extend(event.logprobs or ())
                    finished = event.finish_reason is not None
                    if event.finish_reason == "error":
                        raise request.exception or VicunaError(f"generation failed: {event.error}")
                    if event.text:
                        self.text += event.text
                        yield event.text
        finally:  # also on KeyboardInterrupt or when the consumer stops early
            if not finished:
                request.cancel()
                batch.reap()
