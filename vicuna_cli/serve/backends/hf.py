"""The `hf` worker backend (the default): a model loaded by core/models.py, prompts encoded by
core/encoding.py, and core/batch.py's BatchEngine (continuous batching: requests join between
decode steps).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ...core.encoding import EncodedPrompt
from ..protocol import GenerateParams, GenerateRequest, ServeError, WorkerModel
from .base import WorkerStream, choice_seed, encode_request


class HFBackend:
    def __init__(
        self,
        name: str,
        model_ref: str | None,
        template: str | None,
        device: str,
        dtype: str,
        implementation: str,
        max_batch_size: int,
        max_queue: int,
        prefix_cache_mb: int,
        *,
        trust_remote_code: bool = False,
        threads: int | None = None,
        quantize: str = "none",
    ):
        from ...core import models
        from ...core.batch import BatchEngine
        from ...core.templates import template_for_model

        self.loaded = models.load(model_ref, device=device, dtype=dtype, implementation=implementation,
                                  trust_remote_code=trust_remote_code, quantize=quantize, batch_rows=max_batch_size)
        self.template = template_for_model(self.loaded.tokenizer, template or self.loaded.template_hint)
        self.tokenizer = self.loaded.tokenizer
        self.engine = BatchEngine(
            self.loaded.model, self.loaded.tokenizer, self.loaded.context_length, max_batch_size=max_batch_size, max_queue=max_queue,
            prefix_cache_bytes=prefix_cache_mb * 2**20, threads=threads,
        )
        self.context_length = self.loaded.context_length
        self.model = WorkerModel(name=name, backend="hf", context_length=self.context_length, template=self.template.name)
        self.engine.start()

    def counts(self) -> tuple[int, int]:
        return int(self.engine.num_running), int(self.engine.num_waiting)

    def prompt_ids(self, request: GenerateRequest) -> EncodedPrompt:
        """Token ids and the stop strings that come with them (the template's, for chat)."""
        return encode_request(self.tokenizer, self.template, self.context_length, request)

    async def open(self, request: GenerateRequest) -> WorkerStream:
        from ...core.batch_request import EngineStopped, QueueFull
        from ...core.generate import ContextOverflow, InvalidParams, SamplingParams

        prompt = self.prompt_ids(request)
        ids, stop, p = prompt.ids, prompt.stop, request.params
        room = self.context_length - len(ids)
        grammar = await asyncio.to_thread(self.grammar, p.response_format) if p.response_format else None
        handles = []
        try:
            for index in range(p.n):
                params = SamplingParams(
                    **engine_params(p, stop, min(p.max_tokens or room, room), choice_seed(p.seed, index)), grammar=grammar
                )
                handles.append(self.engine.submit(ids, params))
        except BaseException as exc:
            _cancel_all(handles)
            if isinstance(exc, QueueFull):
                raise ServeError(429, f"the worker's queue is full ({exc.message}); retry later", "queue_full") from None
            if isinstance(exc, EngineStopped):
                raise ServeError(503, exc.message, "worker_draining") from None
            if isinstance(exc, ContextOverflow):
                raise ServeError(400, exc.message, "context_length_exceeded") from None
            if isinstance(exc, InvalidParams):
                raise ServeError(400, exc.message, "invalid_value", exc.param) from None
            raise
        sources = [self._events(index, handle, p) for index, handle in enumerate(handles)]
        # n choices share one prompt, counted once (as OpenAI does): the first choice's reuse.
        return WorkerStream(len(ids), sources, lambda: _cancel_all(handles), lambda: handles[0].stats.cached_tokens)

    def grammar(self, response_format: dict[str, Any] | None) -> Any:
        """response_format -> a compiled structured.Grammar (cached per schema), or None for text."""
        from ...core.structured import ResponseFormatError, StructuredOutputUnavailable, compile_response_format

        try:
            vocab_size = int(self.loaded.model.config.vocab_size)
            return compile_response_format(response_format, self.tokenizer, vocab_size, self.engine.stop_token_ids)
        except ResponseFormatError as exc:
            code = "response_format_unavailable" if isinstance(exc, StructuredOutputUnavailable) else "invalid_value"
            raise ServeError(400, exc.message, code, "response_format") from None

    async def _events(self, index: int, handle: Any, p: GenerateParams) -> AsyncIterator[dict]:
        async for event in handle.aevents():
            if event.finish_reason == "error":
                raise ServeError(500, f"the engine failed while generating: {event.error or 'unknown error'}", "engine_error")
            yield {
                "index": index,
                "text": event.text,
                "token_ids": list(event.token_ids),
                "logprobs": [_logprob_dict(e) for e in event.logprobs] if p.logprobs and event.logprobs else None,
                "finish_reason": event.finish_reason,
            }

    async def close(self) -> None:
        self.engine.stop(cancel_running=True)


def _cancel_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.cancel()


def _logprob_dict(entry: Any) -> dict:
    """core TokenLogprob -> OpenAI's logprobs.content item."""
    item = {"token": entry.token, "logprob": float(entry.logprob), "bytes": list(entry.bytes)}
    return {**item, "top_logprobs": [{"token": t.token, "logprob": float(t.logprob), "bytes": list(t.bytes)} for t in entry.top_logprobs]}


def engine_params(p: GenerateParams, stop: tuple[str, ...], max_new_tokens: int, seed: int | None) -> dict[str, Any]:
    """GenerateParams -> keyword arguments of core SamplingParams."""
    return {
        "temperature": p.temperature,
        "top_p": p.top_p if p.top_p > 0 else 1e-9,  # OpenAI allows 0 (only the top token); the engine wants (0, 1]
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "stop": stop,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logprobs": p.logprobs,
        "top_logprobs": p.top_logprobs,
    }

