"""The generation engine: streaming text from a local model. Chat, serve and judge all use it.

One call = one `Generation`, an iterator of text deltas that
  - samples with temperature / top-p / top-k / repetition penalty (`sampling.py`, the same maths
    as transformers' logits processors), reproducibly with `seed`;
  - stops at EOS tokens and at stop strings, which never reach the output, even when a stop
    string arrives split over several tokens (text that could be the start of one is held back);
  - detokenizes incrementally without ever emitting half a UTF-8 character;
  - can be cancelled between tokens (`cancel()`, an Event, or closing the iterator);
  - records stats: prompt/output tokens, time to first token, tokens/s, finish reason.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from .errors import VicunaError
from .sampling import make_picker


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # <= 1e-5 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float | None = None  # seconds, from the call to the first token
    total_time: float = 0.0
    finish_reason: str = ""  # stop | length | cancelled

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        if self.output_tokens < 2 or self.time_to_first_token is None:
            return 0.0
        return (self.output_tokens - 1) / max(self.total_time - self.time_to_first_token, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2)}


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
    """Streaming generation over one loaded causal LM (batch 1; serve batches on top of it)."""

    def __init__(self, model: Any, tokenizer: Any, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.stop_token_ids = eos_token_ids(model, tokenizer)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        cancel: threading.Event | None = None,
    ) -> "Generation":
        if len(prompt_ids) == 0:
            raise VicunaError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ContextOverflow(len(prompt_ids), self.context_length)
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

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids), finish_reason="cancelled")
        try:
            for delta in self._stream(start):
                self.text += delta
                yield delta
        finally:  # also on KeyboardInterrupt or when the consumer stops early
            self.stats.output_tokens = len(self.output_ids)
            self.stats.total_time = time.perf_counter() - start

    def _stream(self, start: float) -> Iterator[str]:
        import torch

        engine, params = self.engine, self.params
        detok = IncrementalDetokenizer(engine.tokenizer, self.prompt_ids)
        stops = StopStringFilter(params.stop)
        pick = make_picker(
            params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.seed, engine.device
        )
        budget = min(params.max_new_tokens, engine.context_length - len(self.prompt_ids))
        ids = torch.tensor([self.prompt_ids], device=engine.device)
        history = ids
        cache = _new_cache(engine.model, len(self.prompt_ids) + budget)
        reason = "length"
        with torch.inference_mode():
            logits = engine.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            for _ in range(budget):
                if self.cancel_event.is_set():
                    reason = "cancelled"
                    break
                token = pick(history, logits[:, -1, :])
                token_id = int(token)
                if self.stats.time_to_first_token is None:
                    self.stats.time_to_first_token = time.perf_counter() - start
                if token_id in engine.stop_token_ids:
                    reason = "stop"
                    break
                self.output_ids.append(token_id)
                if params.repetition_penalty != 1.0:  # the only processor that reads the history
                    history = torch.cat([history, token.view(1, 1)], dim=1)
                text = stops.feed(detok.push(token_id))
                if text:
                    yield text
                if stops.stopped:
                    reason = "stop"
                    break
                if len(self.output_ids) == budget:
                    break
                logits = engine.model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits
        if not stops.stopped:
            tail = stops.feed(detok.flush())
            tail += stops.flush()
            if tail:
                yield tail
        self.stats.finish_reason = "stop" if stops.stopped else reason


def _new_cache(model: Any, capacity: int) -> Any:
    """The model's own KV cache when it has one (the native Llama path), else transformers'."""
    if hasattr(model, "new_cache"):
        return model.new_cache(capacity)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
