"""Where chat answers come from: a local model (the core engine) or an OpenAI-compatible server.

Both backends offer the same small surface (`ChatBackend`): `start(messages, params)` returns a
stream of text deltas with `.stats` (a GenerationStats) and `.cancel()`; `describe()` says what is
answering. A prompt's walk: messages -> core/encoding.py `encode_prompt` (template, BOS rule, stop
strings, context check) -> core/generate.py `Engine.generate`; or -> the `openai` client, whose
errors core/openai_client.py turns into VicunaErrors.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Protocol, Sequence

from ..core.encoding import encode_prompt
from ..core.errors import VicunaError
from ..core.generate import Engine, GenerationStats, SamplingParams
from ..core.openai_client import api_error, new_client
from ..core.templates import Message, template_for_model


class ReplyStream(Protocol):
    stats: GenerationStats

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class ChatBackend(Protocol):
    name: str
    trims_history: bool  # True when the backend knows its context size and chat must fit it

    def start(self, messages: Sequence[Message], params: SamplingParams) -> ReplyStream: ...

    def describe(self) -> dict[str, Any]: ...


class LocalBackend:
    """A model loaded in this process, spoken to through its conversation template."""

    trims_history = True

    def __init__(
        self,
        model: str | None,
        template: str | None,
        device: str = "auto",
        dtype: str = "auto",
        implementation: str = "auto",
        *,
        trust_remote_code: bool = False,
        threads: int | None = None,
        quantize: str = "none",
    ):
        from ..core import models

        self.loaded = models.load(model, device=device, dtype=dtype, implementation=implementation,
                                  trust_remote_code=trust_remote_code, quantize=quantize)
        self.name = self.loaded.name
        self.template = template_for_model(self.loaded.tokenizer, template or self.loaded.template_hint)
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer, self.loaded.context_length, threads=threads)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """What the session measures when it trims history to fit (no context check here)."""
        return encode_prompt(self.engine.tokenizer, self.template, messages).ids

    def start(self, messages: Sequence[Message], params: SamplingParams) -> ReplyStream:
        prompt = encode_prompt(self.engine.tokenizer, self.template, messages, stop=params.stop,
                               context_length=self.engine.context_length)
        params = SamplingParams(**{**params.__dict__, "stop": prompt.stop})
        return self.engine.generate(prompt.ids, params)

    def describe(self) -> dict[str, Any]:
        lm = self.loaded
        return {
            "backend": "local",
            "model": lm.name,
            "path": str(lm.path),
            "template": self.template.name,
            "device": lm.device,
            "dtype": lm.dtype,
            "implementation": lm.implementation,
            "attention": lm.attention,
            "context_length": lm.context_length,
            "threads": self.engine.batch.threads.describe(),
        }


class OpenAIBackend:
    """Any OpenAI-compatible server (vicuna serve, vLLM, llama.cpp, ollama, OpenAI) via `openai`."""

    trims_history = False  # the server owns the template and the context limit

    def __init__(self, api_base: str, api_key: str | None, model: str | None, timeout: float = 60.0):
        self.api_base = api_base
        self.client = new_client(api_base, api_key, timeout, max_retries=1)
        self.name = model or self._first_model()

    def _call(self, fn, *args, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIError as exc:
            raise api_error(exc, self.api_base, key_hint="pass --api-key or set OPENAI_API_KEY",
                            model=getattr(self, "name", None), model_hint="pass the model id with -m") from exc

    def _first_model(self) -> str:
        listed = self._call(self.client.models.list)
        ids = [m.id for m in listed.data]
        if not ids:
            raise VicunaError(f"{self.api_base} serves no models", hint="pass the model id with -m")
        return ids[0]

    def start(self, messages: Sequence[Message], params: SamplingParams) -> ReplyStream:
        return _OpenAIStream(self, list(messages), params)

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.name, "api_base": self.api_base}


def _wrap_errors(backend: OpenAIBackend, stream: Any) -> Iterator[Any]:
    """Errors while reading the stream (connection dropped, error event) become VicunaErrors."""
    import openai

    iterator = iter(stream)
    while True:
        try:
            chunk = backend._call(next, iterator, None)
        except VicunaError as exc:
            if isinstance(exc.__cause__, openai.APIConnectionError):
                raise VicunaError(f"lost the connection to {backend.api_base} in the middle of the answer") from exc
            raise
        if chunk is None:
            return
        yield chunk


class _OpenAIStream:
    def __init__(self, backend: OpenAIBackend, messages: list[Message], params: SamplingParams):
        self.backend, self.messages, self.params = backend, messages, params
        self.stats = GenerationStats(finish_reason="cancelled")
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self) -> Iterator[str]:
        p = self.params
        start = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=self.backend.name,
            messages=self.messages,
            stream=True,
            stream_options={"include_usage": True},
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_new_tokens,
        )
        if p.seed is not None:
            kwargs["seed"] = p.seed
        if p.stop:
            kwargs["stop"] = list(p.stop)[:4]  # OpenAI accepts at most four
        stream = self.backend._call(self.backend.client.chat.completions.create, **kwargs)
        chunks = 0
        try:
            for chunk in _wrap_errors(self.backend, stream):
                if self._cancelled:
                    break
                if chunk.usage is not None:
                    self.stats.prompt_tokens = chunk.usage.prompt_tokens
                    self.stats.output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if self.stats.time_to_first_token is None:
                            self.stats.time_to_first_token = time.perf_counter() - start
                        chunks += 1
                        yield choice.delta.content
                    if choice.finish_reason:
                        self.stats.finish_reason = choice.finish_reason
        finally:
            stream.close()
            self.stats.total_time = time.perf_counter() - start
            # Servers that send no usage: count streamed chunks, the best estimate there is.
            self.stats.output_tokens = self.stats.output_tokens or chunks
