"""The OpenAI-compatible API server: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
`/health`, `/metrics`, and the web page at `/` (from `static/`, when present).

A request is validated (protocol.py), moderated, dispatched by the controller to the least-loaded
live worker, and streamed back from it. Failures keep OpenAI's error shape and status: before the
first byte as an HTTP error, after it (streaming) as an error event followed by `[DONE]`. A worker
that dies mid-answer is noticed at once when its connection drops, and within `worker_timeout`
seconds when it merely goes silent (workers send keepalives), so no request hangs.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse

from .common import AccessLogMiddleware, install_error_handlers, log_json, merge_streams
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
from .security import ApiKeyMiddleware, BodyLimitMiddleware, add_cors, secret_headers

STATIC_DIR = Path(__file__).parent / "static"


class Upstream:
    """The API's view of the cluster: the controller and the workers it names."""

    def __init__(self, controller: str, secret: str | None, worker_timeout: float):
        import httpx

        self.controller = controller.rstrip("/")
        self.worker_timeout = worker_timeout
        # Waiting for a worker to start answering may take longer than its keepalive interval (an
        # overloaded worker is slow, not dead); silence once it streams is bounded by worker_timeout.
        self.start_timeout = max(5 * worker_timeout, 30.0)
        self.client = httpx.AsyncClient(
            headers=secret_headers(secret),
            timeout=httpx.Timeout(connect=3.0, read=self.start_timeout, write=10.0, pool=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def _controller(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            response = await self.client.request(method, f"{self.controller}{path}", json=body, timeout=5.0)
        except httpx.HTTPError as exc:
            raise ServeError(503, f"the controller {self.controller} is unreachable ({type(exc).__name__})", "controller_unreachable") from None
        source = f"the controller {self.controller}"
        data = _json(response.content)
        if response.status_code != 200:
            raise ServeError.from_body(response.status_code if response.status_code in (400, 401, 404, 503) else 503, data, source)
        if isinstance(data, str):  # not JSON
            raise ServeError.from_body(200, data, source)
        return data

    async def workers(self) -> list[dict[str, Any]]:
        return await self._controller("GET", "/workers")

    async def report(self, address: str, reason: str) -> None:
        try:
            await self._controller("POST", "/report", {"address": address, "reason": reason})
        except ServeError:
            pass

    async def start(self, request: GenerateRequest, sequences: int) -> tuple[str, Any]:
        """Open a generation stream on the best worker; fall over to the next candidate when one
        is unreachable or full. Errors before streaming are raised as ServeError. `sequences`:
        of the whole client request, which the controller refuses if no set of workers holds it."""
        import httpx

        dispatch = {"model": request.model, "n": request.params.n, "sequences": sequences}
        candidates = (await self._controller("POST", "/dispatch", dispatch)).get("candidates")
        if not candidates or not isinstance(candidates, list):
            raise ServeError(502, f"the controller {self.controller} named no worker for {request.model!r}", "bad_upstream_reply")
        last: ServeError | None = None
        for address in candidates[:3]:
            try:
                response = await self.client.send(
                    self.client.build_request("POST", f"{address}/generate", json=request.model_dump()), stream=True
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nobody there: tell the controller
                reason = f"{type(exc).__name__}"
                await self.report(address, reason)
                last = ServeError(503, f"no live worker serves model {request.model!r}: worker {address} is unreachable ({reason})", "no_worker")
                continue
            except httpx.TransportError as exc:  # there, but not answering in time: overloaded or stuck
                last = ServeError(503, f"worker {address} did not start answering within {self.start_timeout:g} s ({type(exc).__name__})", "worker_timeout")
                continue
            if response.status_code == 200:
                return address, response
            body = _json(await _read_at_most(response, MAX_ERROR_BYTES))
            await response.aclose()
            last = ServeError.from_body(response.status_code, body, f"worker {address}")
            if response.status_code not in (429, 503):
                break
        assert last is not None
        raise last

    async def events(self, address: str, response: Any, abandoned: Callable[[], bool]) -> AsyncIterator[dict]:
        """Worker events, keepalives dropped; a lost worker becomes a 503 ServeError. Once the
        caller has `abandoned` the stream (its client left), a broken read is our own doing: the
        stream just ends, and the worker is not reported."""
        import httpx

        finished = False
        lines = response.aiter_lines()
        try:
            while True:
                try:
                    line = await asyncio.wait_for(lines.__anext__(), timeout=self.worker_timeout)
                except StopAsyncIteration:
                    break
                if not line:
                    continue
                event = _json(line)
                if not isinstance(event, dict):
                    raise ServeError.from_body(200, line[:1000], f"worker {address}")
                if "keepalive" in event:
                    continue
                if "error" in event:
                    status = event.get("status")
                    raise ServeError.from_body(status if isinstance(status, int) and 400 <= status < 600 else 502, event, f"worker {address}")
                if "usage" in event:
                    finished = True
                yield event
        except (asyncio.TimeoutError, httpx.ReadTimeout):
            if abandoned():
                return
            await self.report(address, f"silent for {self.worker_timeout:g} s")
            raise ServeError(503, f"worker {address} stopped answering for {self.worker_timeout:g} s in the middle of the answer", "worker_lost") from None
        except httpx.TransportError as exc:
            if abandoned():
                return
            await self.report(address, type(exc).__name__)
            raise ServeError(503, f"worker {address} went away in the middle of the answer ({type(exc).__name__})", "worker_lost") from None
        finally:
            await response.aclose()
        if not finished:
            raise ServeError(503, f"worker {address} ended the answer early", "worker_lost")

    async def close(self) -> None:
        await self.client.aclose()


def _json(data: bytes | str) -> Any:
    """Parsed JSON, or the text itself when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


# An error reply of a worker is a few hundred bytes; more is not read (nor kept).
MAX_ERROR_BYTES = 64 << 10


async def _read_at_most(response: Any, limit: int) -> bytes:
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


# ---------------------------------------------------------------------------------------------
# One request: several worker streams (n, or a list of completion prompts) merged


class Job:
    """A client request turned into worker streams; merges their events with global indices."""

    def __init__(self, upstream: Upstream, timer: RequestTimer, requests: list[GenerateRequest]):
        self.upstream, self.timer, self.requests = upstream, timer, requests
        self.streams: list[tuple[str, Any]] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.reasons: dict[int, str | None] = {}
        self.closed = False  # set before we close the worker streams ourselves

    async def start(self) -> None:
        sequences = sum(r.params.n for r in self.requests)
        try:
            for request in self.requests:
                self.streams.append(await self.upstream.start(request, sequences))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self.closed = True
        for _, response in self.streams:
            await response.aclose()

    async def _tagged(self, offset: int, address: str, response: Any) -> AsyncIterator[dict]:
        async for event in self.upstream.events(address, response, lambda: self.closed):
            if "usage" in event:
                self.prompt_tokens += int(event["usage"].get("prompt_tokens", 0))
                self.completion_tokens += int(event["usage"].get("completion_tokens", 0))
                self.cached_tokens += int(event["usage"].get("cached_tokens", 0))
                continue
            event["index"] = offset + int(event.get("index", 0))
            yield event

    async def events(self) -> AsyncIterator[dict]:
        n = self.requests[0].params.n
        sources = [self._tagged(i * n, a, r) for i, (a, r) in enumerate(self.streams)]
        # aclosing: a client that leaves closes this chain from the outside in, so the merge's
        # readers stop before close() shuts their streams (rather than whenever the GC gets to it).
        try:
            async with aclosing(merge_streams(sources)) as items:
                async for item in items:
                    if item.get("finish_reason") == "cancelled":
                        raise ServeError(503, "the worker stopped before the answer was complete (it is shutting down)", "worker_cancelled")
                    self.timer.tokens(len(item.get("token_ids") or ()))
                    if item.get("finish_reason"):
                        self.reasons[item["index"]] = item["finish_reason"]
                    yield item
            self.timer.finish(list(self.reasons.values()), self.prompt_tokens, self.completion_tokens)
        finally:
            await self.close()

    async def collect(self, total: int, prefix: dict[int, str] | None = None) -> tuple[dict[int, str], dict[int, list[dict]]]:
        """The whole answer (non-streaming): text and logprob entries per choice index."""
        texts: dict[int, list[str]] = {i: [(prefix or {}).get(i, "")] for i in range(total)}
        logprobs: dict[int, list[dict]] = {i: [] for i in range(total)}
        try:
            async with aclosing(self.events()) as events:
                async for event in events:
                    texts[event["index"]].append(event.get("text") or "")
                    logprobs[event["index"]].extend(event.get("logprobs") or [])
        except ServeError as exc:
            self.timer.failed(exc.status)
            raise
        return {i: "".join(parts) for i, parts in texts.items()}, logprobs

    def usage(self) -> dict[str, int]:
        # prompt_tokens_details.cached_tokens: OpenAI's (and vLLM's) report of prefix-cache reuse.
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


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
    worker_timeout: float = 6.0,
    shutdown_timeout: float = 30.0,
) -> Any:
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
        request.state.log.update(model=model)
        timer = RequestTimer(metrics, model)
        try:
            await moderation.check(texts)
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
