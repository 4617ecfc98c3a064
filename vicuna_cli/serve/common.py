"""What the three roles (controller, worker, API) share: OpenAI-shaped errors for every failure,
one structured access-log line per request, and running an app under uvicorn with a graceful
shutdown (stop accepting, let in-flight requests finish up to a timeout, then cancel)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, AsyncIterator, Callable

from .protocol import ServeError

# ---------------------------------------------------------------------------------------------
# Errors


def install_error_handlers(app: Any) -> None:
    """Every error leaves as {"error": {message, type, param, code}} with the right status; a
    validation error is a 400 naming the field (OpenAI's status, not FastAPI's 422)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def serve_error(request: Any, exc: ServeError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation_error(request: Any, exc: RequestValidationError) -> Any:
        return JSONResponse(validation_to_error(exc.errors()).body(), status_code=400)

    async def http_error(request: Any, exc: HTTPException) -> Any:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        error = ServeError(status, message if status != 404 else f"no route {request.url.path}", code)
        return JSONResponse(error.body(), status_code=status, headers=getattr(exc, "headers", None))

    async def unexpected(request: Any, exc: Exception) -> Any:
        log_json({"event": "error", "path": request.url.path, "error": f"{type(exc).__name__}: {exc}"})
        return JSONResponse(ServeError(500, f"internal error: {type(exc).__name__}", "internal_error").body(), status_code=500)

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def validation_to_error(errors: Any) -> ServeError:
    first = list(errors)[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ServeError(400, "the request body is not valid JSON", "invalid_json")
    message = str(first.get("msg", "invalid request"))
    return ServeError(400, f"{param}: {message}" if param else message, "invalid_value", param)


# ---------------------------------------------------------------------------------------------
# Streams


async def merge_streams(sources: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators in arrival order; an error in any one ends them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(source: AsyncIterator[Any]) -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        # Let the readers stop before whoever closes their sources next pulls the connection from
        # under a read in flight (a broken read would look like a lost worker).
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_at_most(response: Any, limit: int) -> bytes:
    """The start of a streamed httpx response's body: an unexpected reply is not read (nor kept)
    beyond what we need to see."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


# ---------------------------------------------------------------------------------------------
# Structured logs: one JSON object per line on stderr


def log_json(record: dict[str, Any]) -> None:
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z", **record}
    sys.stderr.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
    sys.stderr.flush()


class AccessLogMiddleware:
    """One line per request, written when the response (a whole stream, too) has been sent.
    Handlers add fields (model, tokens, worker) through `request.state.log`."""

    def __init__(self, app: Any, role: str, quiet_paths: tuple[str, ...] = ()):
        self.app, self.role, self.quiet_paths = app, role, quiet_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0
        scope.setdefault("state", {})["log"] = extra = {}

        async def tracking_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            if scope.get("path") not in self.quiet_paths or status >= 400:
                client = scope.get("client") or ("", 0)
                log_json({
                    "role": self.role,
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status or 499,  # 499: the client went away before an answer
                    "ms": round((time.perf_counter() - start) * 1000, 1),
                    "client": f"{client[0]}:{client[1]}",
                    **extra,
                })


# ---------------------------------------------------------------------------------------------
# Running


# How long a server keeps an idle connection open. It must exceed every client's idle expiry
# (httpx's, which the API, workers and the openai client use, is 5 s): uvicorn's default is also
# 5 s, and when both ends time out together the client can send a request on a socket the server
# is closing; the reset surfaced as a ReadError that made the API drop a healthy worker.
SERVER_KEEPALIVE_S = 30.0


def run_app(app: Any, host: str, port: int, shutdown_timeout: float, on_exit: Callable[[], Any] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, give in-flight requests `shutdown_timeout`
    seconds, cancel the rest, and run the app's lifespan shutdown (e.g. deregistering)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,  # AccessLogMiddleware writes structured lines instead
        log_level="warning",
        timeout_graceful_shutdown=max(shutdown_timeout, 0.1),
        timeout_keep_alive=SERVER_KEEPALIVE_S,
        lifespan="on",
    )
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown, so the process would die
            # by SIGTERM/SIGINT (exit -15, or a KeyboardInterrupt). A requested, completed stop is
            # a normal exit here: 0. (A second Ctrl-C still forces the exit.)
            self._captured_signals.clear()

    server = Server(config)
    app.state.server = server
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind (and logs why)
        if exc.code in (0, None):
            raise
        from ..core.errors import VicunaError

        raise VicunaError(f"cannot listen on {host}:{port}", hint="is the port taken? pick another --port") from None


async def wait_for_start(app: Any, poll: float = 0.05) -> None:
    """Returns once uvicorn listens (at once without uvicorn, e.g. under a test client): a worker
    must answer the controller's challenge before it can register."""
    while (server := getattr(app.state, "server", None)) is not None and not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(poll)


async def wait_for_exit(app: Any, poll: float = 0.1) -> None:
    """Returns once uvicorn has been told to stop (a signal), so a role can deregister at once,
    before in-flight requests drain."""
    while True:
        server = getattr(app.state, "server", None)
        if server is not None and server.should_exit:
            return
        await asyncio.sleep(poll)
