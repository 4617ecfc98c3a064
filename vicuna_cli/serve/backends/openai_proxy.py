"""The `openai` worker backend: a proxy to an upstream OpenAI-compatible endpoint, so a hosted
model can sit beside local ones behind one API, as in the original Vicuna demo. The upstream owns
the template, the stop strings and the context check.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from ..protocol import GenerateRequest, ServeError, WorkerModel
from .base import WorkerStream


class OpenAIProxyBackend:
    def __init__(self, name: str, upstream: str, upstream_model: str | None, api_key: str | None, max_queue: int,
                 timeout: float = 600.0):
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

    async def open(self, request: GenerateRequest) -> WorkerStream:
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
        generation = WorkerStream(0, [])
        generation.sources = [self._events(response, generation, chat=request.messages is not None)]
        generation.on_cancel = lambda: asyncio.ensure_future(response.aclose())
        return generation

    async def _events(self, response: Any, generation: WorkerStream, chat: bool) -> AsyncIterator[dict]:
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

