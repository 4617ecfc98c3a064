"""The OpenAI-compatible API server: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
`/health`, `/metrics`, the web page at `/` (from `static/`, when present), and with an arena
the side-by-side battle page and its API (arena.py).

A request is validated (protocol.py), moderated, dispatched by the controller to the least-loaded
live worker, and streamed back from it (upstream.py); a client that hangs up, streaming or not,
cancels its generations. Failures keep OpenAI's error shape and status: before the
first byte as an HTTP error, after it (streaming) as an error event followed by `[DONE]`. A worker
that dies mid-answer is noticed at once when its connection drops, and within `worker_timeout`
seconds when it merely goes silent (workers send keepalives), so no request hangs.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse

from .common import AccessLogMiddleware, install_error_handlers, log_json
from .config import WORKER_EXPIRY
from .metrics import ApiMetrics, RequestTimer
from .moderation import NoModeration
from .protocol import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    GenerateParams,
    GenerateRequest,
    ModelCard,
    ModelList,
    ServeError,
    new_id,
    now,
)
from .security import ApiKeyMiddleware, BodyLimitMiddleware, add_cors
from .upstream import Job, Upstream

STATIC_DIR = Path(__file__).parent / "static"


def _params(body: Any, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> GenerateParams:
    return GenerateParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=max_tokens,
        seed=body.seed,
        stop=body.stop_list(),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=body.n,
        response_format=body.response_format,
    )


def _completion_logprobs(entries: list[dict]) -> dict[str, Any]:
    """Chat-style logprob entries -> the legacy completions shape."""
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    tops = []
    for entry in entries:
        top: dict[str, float] = {}
        for alt in entry.get("top_logprobs", []):  # most likely first; two ids can decode alike
            top.setdefault(alt["token"], alt["logprob"])
        tops.append(top)
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------------------------
# The app


def create_app(
    controller: str,
    secret: str | None = None,
    api_keys: list[str] | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = 1 << 20,
    moderation: Any = None,
    worker_timeout: float = WORKER_EXPIRY,
    shutdown_timeout: float = 30.0,
    arena: Any = None,
) -> Any:
    """`arena`: an arena.ArenaSettings to serve the arena, else None."""
    metrics = ApiMetrics()
    moderation = moderation or NoModeration()
    holder: dict[str, Upstream] = {}

    @asynccontextmanager
    async def lifespan(app: Any):
        holder["upstream"] = Upstream(controller, secret, worker_timeout)
        log_json({"role": "api", "event": "started", "controller": controller, "moderation": moderation.name,
                  "api_keys": len(api_keys or [])})
        try:
            yield
        finally:
            await holder["upstream"].close()

    app = FastAPI(title="vicuna API", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API of `vicuna serve`.", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)

    def upstream() -> Upstream:
        return holder["upstream"]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        try:
            metrics.set_load(await upstream().workers())
        except ServeError:
            pass  # the controller is down: latency counters are still worth scraping
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    async def model_cards() -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        for worker in await upstream().workers():
            for m in worker["models"]:
                cards.setdefault(m["name"], ModelCard(id=m["name"], created=now(), max_model_len=m.get("context_length")))
        return sorted(cards.values(), key=lambda c: c.id)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=await model_cards())

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        for card in await model_cards():
            if card.id == model:
                return card
        raise ServeError(404, f"the model {model!r} does not exist", "model_not_found", "model")

    async def run(request: Request, model: str, requests: list[GenerateRequest], texts: list[str]) -> Job:
        try:
            await moderation.check(texts)
        except ServeError as exc:
            RequestTimer(metrics, model).failed(exc.status)
            request.state.log.update(model=model, error=exc.code)
            raise
        return await start(request, model, requests)

    async def start(request: Request, model: str, requests: list[GenerateRequest]) -> Job:
        request.state.log.update(model=model)
        timer = RequestTimer(metrics, model)
        try:
            job = Job(upstream(), timer, requests)
            await job.start()
        except ServeError as exc:
            timer.failed(exc.status)
            request.state.log.update(error=exc.code)
            raise
        return job

    async def collect(request: Request, job: Job, total: int, prefix: dict[int, str] | None = None) -> tuple[dict, dict]:
        """The whole answer, unless the client hangs up first: then the worker streams are closed,
        so the workers cancel the generations and free their slots at once (rather than after
        max_tokens, which may be most of the context)."""
        answer = asyncio.ensure_future(job.collect(total, prefix))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, gone):
                task.cancel()
            await asyncio.gather(answer, gone, return_exceptions=True)
        if answer.cancelled():
            job.timer.failed(499)
            request.state.log.update(error="client_closed_request")
            raise ServeError(499, "the client closed the connection before the answer was complete", "client_closed_request")
        return answer.result()

    def finish_log(request: Request, job: Job) -> None:
        request.state.log.update(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens)

    def sse(request: Request, job: Job, chunks: AsyncIterator[dict]) -> Any:
        async def body() -> AsyncIterator[dict]:
            try:
                async with aclosing(chunks):
                    async for chunk in chunks:
                        yield {"data": json.dumps(chunk, separators=(",", ":"))}
            except Exception as exc:  # after the first byte, a failure can only be an event
                error = exc if isinstance(exc, ServeError) else ServeError(500, f"internal error: {type(exc).__name__}", "internal_error")
                if not isinstance(exc, ServeError):
                    log_json({"role": "api", "event": "error", "error": f"{type(exc).__name__}: {exc}"})
                job.timer.failed(error.status)
                request.state.log.update(error=error.code)
                yield {"data": json.dumps(error.body())}
            finish_log(request, job)
            yield {"data": "[DONE]"}

        return EventSourceResponse(body(), ping=15, shutdown_grace_period=max(shutdown_timeout - 1, 0))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        params = _params(body, body.token_limit(), bool(body.logprobs), body.top_logprobs or 0)
        gen = GenerateRequest(model=body.model, request_id=new_id("chatcmpl"), messages=messages, params=params)
        job = await run(request, body.model, [gen], [m["content"] for m in messages if m["role"] != "assistant"])
        base = {"id": gen.request_id, "created": now(), "model": body.model}
        if body.stream:
            return sse(request, job, _chat_chunks(job, base, body.n, body.include_usage()))
        texts, logprobs = await collect(request, job, body.n)
        finish_log(request, job)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]},
             "logprobs": {"content": logprobs[i]} if body.logprobs else None, "finish_reason": job.reasons.get(i)}
            for i in range(body.n)
        ]
        return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": job.usage()})

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        want_logprobs = body.logprobs is not None
        params = _params(body, body.max_tokens or 16, want_logprobs, body.logprobs or 0)
        request_id = new_id("cmpl")
        prompts = body.prompts()
        gens = [GenerateRequest(model=body.model, request_id=f"{request_id}-{i}", prompt=p, params=params) for i, p in enumerate(prompts)]
        job = await run(request, body.model, gens, prompts)
        base = {"id": request_id, "created": now(), "model": body.model}
        total = body.n * len(prompts)
        echo = {i: (prompts[i // body.n] if body.echo else "") for i in range(total)}
        if body.stream:
            return sse(request, job, _completion_chunks(job, base, body.include_usage(), want_logprobs, echo))
        texts, logprobs = await collect(request, job, total, echo)
        finish_log(request, job)
        choices = [
            {"index": i, "text": texts[i], "logprobs": _completion_logprobs(logprobs[i]) if want_logprobs else None,
             "finish_reason": job.reasons.get(i)}
            for i in range(total)
        ]
        return JSONResponse({**base, "object": "text_completion", "choices": choices, "usage": job.usage()})

    if arena is not None:
        from . import arena as arena_routes

        async def served_models() -> list[str]:
            return [card.id for card in await model_cards()]

        async def start_chat(request: Request, model: str, messages: list[dict], params: GenerateParams) -> Job:
            return await start(request, model, [GenerateRequest(model=model, request_id=new_id("arena"), messages=messages, params=params)])

        arena_routes.install(app, arena, served_models, moderation.check, start_chat, STATIC_DIR / "arena.html")

    if STATIC_DIR.is_dir():
        from starlette.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> Any:
            index = STATIC_DIR / "index.html"
            if not index.is_file():
                raise ServeError(404, "the web page is not installed", "not_found")
            return FileResponse(index)

    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=list(api_keys or []))
    app.add_middleware(AccessLogMiddleware, role="api", quiet_paths=("/health", "/metrics"))
    add_cors(app, list(cors_origins or []))
    return app


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the server's next message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chat_chunks(job: Job, base: dict, n: int, include_usage: bool) -> AsyncIterator[dict]:
    chunk = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    for i in range(n):  # the role comes first, as OpenAI sends it
        yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}], **extra}
    async with aclosing(job.events()) as events:
        async for event in events:
            i = event["index"]
            if event.get("text") or event.get("logprobs"):
                logprobs = {"content": event["logprobs"]} if event.get("logprobs") else None
                yield {**chunk, "choices": [{"index": i, "delta": {"content": event.get("text") or ""}, "logprobs": logprobs, "finish_reason": None}], **extra}
            if event.get("finish_reason"):
                yield {**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": event["finish_reason"]}], **extra}
    if include_usage:
        yield {**chunk, "choices": [], "usage": job.usage()}


async def _completion_chunks(job: Job, base: dict, include_usage: bool, want_logprobs: bool, echo: dict[int, str]) -> AsyncIterator[dict]:
    chunk = {**base, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    for i, text in echo.items():
        if text:
            yield {**chunk, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}], **extra}
    async with aclosing(job.events()) as events:
        async for event in events:
            logprobs = _completion_logprobs(event.get("logprobs") or []) if want_logprobs and event.get("logprobs") else None
            if event.get("text") or logprobs or event.get("finish_reason"):
                yield {**chunk, "choices": [{"index": event["index"], "text": event.get("text") or "", "logprobs": logprobs,
                                             "finish_reason": event.get("finish_reason")}], **extra}
    if include_usage:
        yield {**chunk, "choices": [], "usage": job.usage()}
