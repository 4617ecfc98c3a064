"""The API's side of the cluster: the controller it asks for workers (`Upstream`), and one client
request turned into worker streams whose events are merged (`Job`).

Whatever a worker or the controller answers is parsed defensively: an error in OpenAI's shape is
passed on, anything else becomes a generic 502 and goes to the log (protocol.ServeError.from_body),
so a client never reads another service's reply through the API, and no reply is a 500.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from .common import merge_streams, read_at_most
from .metrics import RequestTimer
from .protocol import GenerateRequest, ServeError
from .security import secret_headers


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
            body = _json(await read_at_most(response, MAX_ERROR_BYTES))
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
