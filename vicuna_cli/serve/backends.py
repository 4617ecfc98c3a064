"""What a worker generates with, behind one small interface:

- `hf` (default): a model loaded by core/models.py, prompts rendered by core/templates.py, and
  core/batch.py's BatchEngine (continuous batching: requests join between decode steps);
- `vllm` (extra, GPU): vLLM's async engine, fed the same token ids;
- `openai`: a proxy to an upstream OpenAI-compatible endpoint, so a hosted model can sit beside
  local ones behind one API, as in the original Vicuna demo.

`open(request)` validates and queues (raising ServeError 400/429 before anything is streamed);
the returned `Generation` yields event dicts (see protocol.py) and can be cancelled.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol

from ..core.errors import VicunaError
from .common import merge_streams
from .protocol import GenerateParams, GenerateRequest, ServeError, WorkerModel


class Generation:
    """Several choice streams (n) merged into one stream of events, then a usage event."""

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


class Backend(Protocol):
    model: WorkerModel

    def counts(self) -> tuple[int, int]:  # (running, waiting)
        ...

    async def open(self, request: GenerateRequest) -> Generation: ...

    async def close(self) -> None: ...


def choice_seed(seed: int | None, index: int) -> int | None:
    """n choices with one seed must still differ, and each stays reproducible."""
    return None if seed is None else (seed + index) % 2**63


# ---------------------------------------------------------------------------------------------
# hf: the local engine


class HFBackend:
    def __init__(
        self,
        name: str,
        model_ref: str | None,
        template: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        implementation: str = "auto",
        max_batch_size: int = 16,
        max_queue: int = 256,
        prefix_cache_mb: int = 256,
        *,
        trust_remote_code: bool = False,
        threads: int | None = None,
        quantize: str = "none",
    ):
        from ..core import models
        from ..core.templates import template_for_model

        from ..core.batch import BatchEngine

        self.loaded = models.load(model_ref, device=device, dtype=dtype, implementation=implementation,
                                  trust_remote_code=trust_remote_code, quantize=quantize)
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

    def prompt_ids(self, request: GenerateRequest) -> tuple[list[int], tuple[str, ...]]:
        """Token ids and the stop strings that come with them (the template's, for chat)."""
        if request.messages is not None:
            try:
                text = self.template.prompt_text(request.messages, add_generation_prompt=True)
            except VicunaError as exc:
                raise ServeError(400, exc.message, "invalid_messages", "messages") from None
            # A Jinja chat template writes its own BOS; the fixed templates rely on the tokenizer's.
            special = self.template.name != "auto"
            stops: tuple[str, ...] = tuple(self.template.stop)
        else:
            text, special, stops = request.prompt or "", True, ()
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:
            raise ServeError(400, "the prompt is empty", "empty_prompt", "prompt")
        return ids, stops

    async def open(self, request: GenerateRequest) -> Generation:
        from ..core.batch import EngineStopped, QueueFull
        from ..core.generate import ContextOverflow, InvalidParams, SamplingParams

        ids, template_stops = self.prompt_ids(request)
        p = request.params
        room = self.context_length - len(ids)
        if room < 1:
            raise ServeError(
                400,
                f"the prompt is {len(ids)} tokens but the model's context holds {self.context_length}",
                "context_length_exceeded",
                "messages" if request.messages is not None else "prompt",
            )
        stop = tuple(dict.fromkeys((*template_stops, *p.stop)))
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
        return Generation(len(ids), sources, lambda: _cancel_all(handles), lambda: handles[0].stats.cached_tokens)

    def grammar(self, response_format: dict[str, Any] | None) -> Any:
        """response_format -> a compiled structured.Grammar (cached per schema), or None for text."""
        from ..core.structured import ResponseFormatError, StructuredOutputUnavailable, compile_response_format

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


# ---------------------------------------------------------------------------------------------
# vllm: GPU, behind the extra


def vllm_sampling_kwargs(p: GenerateParams, stop: list[str], max_tokens: int, seed: int | None) -> dict[str, Any]:
    """GenerateParams -> vllm.SamplingParams keyword arguments (one choice per engine request)."""
    return {
        "n": 1,
        "temperature": p.temperature,
        "top_p": p.top_p if p.top_p > 0 else 1e-8,  # vLLM wants top_p in (0, 1]
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": list(stop),
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logprobs": (p.top_logprobs or 0) if p.logprobs else None,
    }


def vllm_structured_outputs(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's response_format -> keyword arguments of vLLM's StructuredOutputsParams (>= 0.12;
    GuidedDecodingParams before, same fields), as vLLM's own OpenAI server maps it."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return {"json_object": True}
    return {"json": response_format["json_schema"]["schema"]}


def vllm_structured_kwargs(vllm_sampling_params: Any, structured: dict[str, Any] | None) -> dict[str, Any]:
    """The vllm.SamplingParams keyword carrying the constraint on the installed vLLM release."""
    if structured is None:
        return {}
    params_class = getattr(vllm_sampling_params, "StructuredOutputsParams", None)
    if params_class is not None:
        return {"structured_outputs": params_class(**structured)}
    return {"guided_decoding": vllm_sampling_params.GuidedDecodingParams(**structured)}


class VLLMBackend:
    """vLLM's AsyncLLM (V1 engine; AsyncLLMEngine on older releases) fed our rendered token ids,
    so templates stay the ones from core/templates.py."""

    def __init__(self, name: str, model_ref: str | None, template: str | None = None, max_batch_size: int = 256,
                 max_queue: int = 1024, dtype: str = "auto", *, trust_remote_code: bool = False):
        from ..core.extras import require
        from ..core.hf import load_pretrained
        from ..core.models import resolve
        from ..core.templates import template_for_model

        vllm = require("vllm", "vllm", "the vllm worker backend")
        try:
            from vllm.v1.engine.async_llm import AsyncLLM as engine_class
        except ImportError:
            engine_class = vllm.AsyncLLMEngine
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.vllm = vllm
        path = resolve(model_ref).path
        self.tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        self.template = template_for_model(self.tokenizer, template)
        self.engine = engine_class.from_engine_args(AsyncEngineArgs(model=str(path), max_num_seqs=max_batch_size, dtype=dtype,
                                                                    trust_remote_code=trust_remote_code))
        self.context_length = int(getattr(self.engine.model_config, "max_model_len", 0) or 2048)
        self.max_queue = max_queue
        self.active = 0
        self.model = WorkerModel(name=name, backend="vllm", context_length=self.context_length, template=self.template.name)

    def counts(self) -> tuple[int, int]:
        return self.active, 0

    prompt_ids = HFBackend.prompt_ids

    async def open(self, request: GenerateRequest) -> Generation:
        import uuid

        from vllm import sampling_params
        from vllm.sampling_params import RequestOutputKind

        ids, template_stops = self.prompt_ids(request)
        p = request.params
        room = self.context_length - len(ids)
        if room < 1:
            raise ServeError(400, f"the prompt is {len(ids)} tokens but the model's context holds {self.context_length}", "context_length_exceeded")
        if self.active + p.n > self.max_queue:
            raise ServeError(429, f"the worker's queue is full ({self.max_queue} requests); retry later", "queue_full")
        stop = list(dict.fromkeys((*template_stops, *p.stop)))
        structured = vllm_structured_kwargs(sampling_params, vllm_structured_outputs(p.response_format))
        sources = []
        for index in range(p.n):
            kwargs = {**vllm_sampling_kwargs(p, stop, min(p.max_tokens or room, room), choice_seed(p.seed, index)), **structured}
            params = self.vllm.SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
            sources.append(self._events(index, ids, params, f"{request.request_id}-{index}-{uuid.uuid4().hex[:6]}"))
        return Generation(len(ids), sources)

    async def _events(self, index: int, ids: list[int], params: Any, request_id: str) -> AsyncIterator[dict]:
        self.active += 1
        try:
            prompt = self.vllm.TokensPrompt(prompt_token_ids=ids)
            # Closing this generator (client gone) makes vLLM abort the request.
            async for output in self.engine.generate(prompt, params, request_id):
                out = output.outputs[0]
                logprobs = None
                if params.logprobs is not None and out.logprobs:
                    logprobs = [self._logprob_entry(tid, step, params.logprobs) for tid, step in zip(out.token_ids, out.logprobs)]
                finish = out.finish_reason if output.finished else None
                yield {"index": index, "text": out.text, "token_ids": list(out.token_ids), "logprobs": logprobs,
                       "finish_reason": {"abort": "cancelled"}.get(finish, finish)}
        finally:
            self.active -= 1

    def _logprob_entry(self, token_id: int, step: dict, top: int) -> dict:
        def one(tid: int, lp: Any) -> dict:
            text = lp.decoded_token if getattr(lp, "decoded_token", None) is not None else self.tokenizer.decode([tid])
            return {"token": text, "logprob": float(lp.logprob), "bytes": list(text.encode("utf-8"))}

        item = one(token_id, step[token_id])
        ranked = sorted(step.items(), key=lambda kv: kv[1].rank or 0)  # the sampled token may sit outside the top
        item["top_logprobs"] = [one(t, lp) for t, lp in ranked][:top]
        return item

    async def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)  # AsyncLLM has it; the old AsyncLLMEngine does not
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------------------------------
# openai: proxy to an upstream OpenAI-compatible endpoint


class OpenAIProxyBackend:
    def __init__(self, name: str, upstream: str, upstream_model: str | None = None, api_key: str | None = None,
                 max_queue: int = 256, timeout: float = 600.0):
        import httpx

        self.upstream = upstream.rstrip("/")
        self.upstream_model = upstream_model or name
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.upstream, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.max_queue = max_queue
        self.active = 0
        self.model = WorkerModel(name=name, backend="openai", context_length=None, template=None)

    def counts(self) -> tuple[int, int]:
        return self.active, 0

    def payload(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        for key in ("seed", "presence_penalty", "frequency_penalty"):
            if getattr(p, key):
                body[key] = getattr(p, key)
        if p.stop:
            body["stop"] = p.stop
        if p.response_format is not None:  # unchanged: the upstream enforces it (or refuses it with a 400)
            body["response_format"] = p.response_format
        if request.messages is not None:
            if p.logprobs:
                body.update(logprobs=True, top_logprobs=p.top_logprobs)
            return "/chat/completions", {**body, "messages": request.messages}
        if p.logprobs:
            body["logprobs"] = p.top_logprobs
        return "/completions", {**body, "prompt": request.prompt or ""}

    async def open(self, request: GenerateRequest) -> Generation:
        import httpx

        if self.active >= self.max_queue:
            raise ServeError(429, f"the worker's queue is full ({self.max_queue} requests); retry later", "queue_full")
        path, body = self.payload(request)
        try:
            response = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise ServeError(502, f"the upstream {self.upstream} is unreachable: {type(exc).__name__}", "upstream_unreachable") from None
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            status = response.status_code if response.status_code in (400, 404, 413, 429) else 502
            raise ServeError.from_body(status, payload)
        generation = Generation(0, [])
        generation.sources = [self._events(response, generation, chat=request.messages is not None)]
        generation.on_cancel = lambda: asyncio.ensure_future(response.aclose())
        return generation

    async def _events(self, response: Any, generation: Generation, chat: bool) -> AsyncIterator[dict]:
        self.active += 1
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise ServeError.from_body(502, chunk)
                if chunk.get("usage"):
                    u = chunk["usage"]
                    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    generation.usage = {"prompt_tokens": u.get("prompt_tokens", 0), "completion_tokens": u.get("completion_tokens", 0),
                                        "cached_tokens": cached}
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    yield {
                        "index": choice.get("index", 0),
                        "text": text or "",
                        "token_ids": [0] if text else [],  # the upstream's ids are not ours; one per chunk
                        "logprobs": _upstream_logprobs(choice.get("logprobs"), chat),
                        "finish_reason": choice.get("finish_reason"),
                    }
        finally:
            self.active -= 1
            await response.aclose()

    async def close(self) -> None:
        await self.client.aclose()


def _upstream_logprobs(logprobs: Any, chat: bool) -> list[dict] | None:
    if not logprobs:
        return None
    if chat:
        return list(logprobs.get("content") or [])
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
         "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8"))} for k, v in (top or {}).items()]}
        for t, lp, top in zip(tokens, values, tops)
    ]


BACKENDS = ("hf", "vllm", "openai")
