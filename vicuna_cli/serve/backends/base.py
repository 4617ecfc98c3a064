"""What every worker backend shares: the `WorkerBackend` protocol, the `WorkerStream` it returns,
and the request -> token ids step of the backends that tokenize themselves (hf, vllm).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol

from ...core.encoding import EncodedPrompt, encode_prompt
from ...core.errors import VicunaError
from ...core.generate import ContextOverflow, EmptyPrompt
from ..common import merge_streams
from ..protocol import GenerateRequest, ServeError, WorkerModel

BACKENDS = ("hf", "vllm", "openai")


class WorkerStream:
    """What `WorkerBackend.open` returns: several choice streams (n) merged into one stream of
    events, then a usage event. (core/generate.py's `Generation` is the chat engine's batch of one.)"""

    def __init__(self, prompt_tokens: int, sources: list[AsyncIterator[dict]], on_cancel: Any = None,
                 cached_tokens: Any = None):
        self.prompt_tokens = prompt_tokens
        self.sources = sources
        self.on_cancel = on_cancel
        self.cached_tokens = cached_tokens  # () -> prompt tokens served from the prefix cache
        self.completion_tokens = 0
        self.usage: dict[str, int] | None = None  # set by backends that know better (openai)

    async def events(self) -> AsyncIterator[dict]:
        try:
            async with aclosing(merge_streams(self.sources)) as items:
                async for item in items:
                    self.completion_tokens += len(item.get("token_ids") or ())
                    yield item
            usage = self.usage or {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
            if self.cached_tokens is not None:
                usage = {**usage, "cached_tokens": int(self.cached_tokens())}
            yield {"usage": usage}
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self.on_cancel is not None:
            self.on_cancel()
            self.on_cancel = None


class WorkerBackend(Protocol):
    model: WorkerModel

    def counts(self) -> tuple[int, int]:  # (running, waiting)
        ...

    async def open(self, request: GenerateRequest) -> WorkerStream: ...

    async def close(self) -> None: ...


def choice_seed(seed: int | None, index: int) -> int | None:
    """n choices with one seed must still differ, and each stays reproducible."""
    return None if seed is None else (seed + index) % 2**63



def encode_request(tokenizer: Any, template: Any, context_length: int, request: GenerateRequest) -> EncodedPrompt:
    """A chat request (messages) or a completion request (prompt) -> token ids and stop strings,
    by core/encoding.py's one rule; its errors become the 400s the OpenAI API answers with."""
    param = "messages" if request.messages is not None else "prompt"
    try:
        return encode_prompt(tokenizer, template, request.messages, text=request.prompt, stop=request.params.stop,
                             context_length=context_length)
    except ContextOverflow as exc:
        raise ServeError(400, exc.message, "context_length_exceeded", param) from None
    except EmptyPrompt as exc:
        raise ServeError(400, exc.message, "empty_prompt", "prompt") from None
    except VicunaError as exc:  # the template refused the messages
        raise ServeError(400, exc.message, "invalid_messages", "messages") from None
