"""A model worker: serves one or more models (backends/) to the API and keeps itself known to
the controller.

- Registers once it listens (retrying while the controller is down; with a shared secret, the
  controller first has the address answer an HMAC challenge, `GET /challenge`), then heartbeats
  every `heartbeat` seconds with its running/waiting counts; a heartbeat answered `known: false`
  (a restarted controller) makes it register again.
- `POST /generate` answers with JSON lines (protocol.py). Queue-full (429), context overflow (400)
  and unknown model (404) are HTTP errors before the stream starts; a failure after that is an
  error line. While nothing else is sent, a keepalive line goes out every `heartbeat` seconds, so
  the API can tell a slow answer from a dead worker with a read timeout.
- On SIGTERM/SIGINT: deregisters at once, refuses new work (503), lets in-flight generations
  finish for up to `shutdown_timeout` seconds, then cancels them and stops the engines.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request

from .backends import WorkerBackend
from .common import AccessLogMiddleware, install_error_handlers, log_json, wait_for_exit, wait_for_start
from .protocol import GenerateRequest, HeartbeatRequest, RegisterRequest, ServeError
from .security import CHALLENGE_PATH, guard, secret_headers, worker_proof


class Membership:
    """Registration and heartbeats with the controller."""

    def __init__(self, controller: str, address: str, backends: list[WorkerBackend], secret: str | None,
                 heartbeat: float, max_batch_size: int, max_queue: int):
        import httpx

        self.controller = controller.rstrip("/")
        self.address = address
        self.backends = backends
        self.heartbeat = heartbeat
        self.worker_id = f"{address.split('//')[-1]}-{uuid.uuid4().hex[:6]}"
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.client = httpx.AsyncClient(headers=secret_headers(secret), timeout=httpx.Timeout(max(heartbeat, 1.0) * 2))
        self.registered = False
        self.ever_registered = False  # then a registration is a rejoin (the controller restarted)
        self._warned = False

    def counts(self) -> tuple[int, int]:
        running = waiting = 0
        for backend in self.backends:
            r, w = backend.counts()
            running, waiting = running + r, waiting + w
        return running, waiting

    async def register(self) -> None:
        running, waiting = self.counts()
        info = RegisterRequest(
            worker_id=self.worker_id, address=self.address, models=[b.model for b in self.backends],
            max_batch_size=self.max_batch_size, max_queue=self.max_queue, running=running, waiting=waiting,
            rejoin=self.ever_registered,
        )
        response = await self.client.post(f"{self.controller}/register", json=info.model_dump())
        self._check(response)
        self.registered = self.ever_registered = True
        log_json({"role": "worker", "event": "registered", "controller": self.controller, "worker": self.worker_id})

    async def beat(self) -> None:
        running, waiting = self.counts()
        beat = HeartbeatRequest(worker_id=self.worker_id, running=running, waiting=waiting)
        response = await self.client.post(f"{self.controller}/heartbeat", json=beat.model_dump())
        self._check(response)
        if not response.json().get("known", False):
            log_json({"role": "worker", "event": "unknown_to_controller", "action": "registering again"})
            await self.register()

    def _check(self, response: Any) -> None:
        if response.status_code != 200:
            raise ServeError.from_body(response.status_code, _json_or_text(response), f"the controller {self.controller}")

    async def run(self) -> None:
        while True:
            try:
                await (self.beat() if self.registered else self.register())
                self._warned = False
            except Exception as exc:  # controller down or restarting: keep trying, say so once
                if not self._warned:
                    # 403: the controller could not verify our address (a wrong --advertise or --secret)
                    refused = isinstance(exc, ServeError) and exc.status == 403
                    log_json({"role": "worker", "event": "registration_refused" if refused else "controller_unreachable",
                              "controller": self.controller, "error": f"{type(exc).__name__}: {exc}"})
                    self._warned = True
                if isinstance(exc, ServeError) and exc.status == 401:
                    self.registered = False
            await asyncio.sleep(self.heartbeat)

    async def deregister(self) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            await self.client.post(f"{self.controller}/deregister", json={"worker_id": self.worker_id}, timeout=2.0)
            log_json({"role": "worker", "event": "deregistered", "worker": self.worker_id})
        except Exception as exc:
            log_json({"role": "worker", "event": "deregister_failed", "error": f"{type(exc).__name__}: {exc}"})


def _json_or_text(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def create_app(backends: list[WorkerBackend], controller: str | None, address: str, secret: str | None,
               heartbeat: float, max_batch_size: int, max_queue: int, max_body_bytes: int) -> Any:
    """The worker's app; the numbers come from WorkerConfig (serve/config.py `run_worker`)."""
    from fastapi.responses import StreamingResponse

    by_name = {b.model.name: b for b in backends}
    membership = Membership(controller, address, backends, secret, heartbeat, max_batch_size, max_queue) if controller else None
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(app: Any):
        async def join() -> None:
            await wait_for_start(app)  # the controller's challenge needs us listening
            await membership.run()

        beats = asyncio.create_task(join()) if membership is not None else None

        async def drain_on_signal() -> None:
            await wait_for_exit(app)
            state["draining"] = True
            if beats is not None:
                beats.cancel()
                await membership.deregister()

        tasks = [t for t in (beats, asyncio.create_task(drain_on_signal())) if t is not None]
        log_json({"role": "worker", "event": "started", "address": address, "models": list(by_name)})
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if membership is not None:
                await membership.deregister()
            for backend in backends:
                await backend.close()
            log_json({"role": "worker", "event": "stopped", "address": address})

    app = FastAPI(title="vicuna worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = membership.counts() if membership else (0, 0)
        return {"status": "draining" if state["draining"] else "ok", "models": list(by_name), "running": running, "waiting": waiting}

    @app.get(CHALLENGE_PATH)
    async def challenge(nonce: str = Query(min_length=16, max_length=128)) -> dict[str, Any]:
        """Open: the proof is bound to our own address, so it vouches for nothing else."""
        return {"proof": worker_proof(secret, nonce, address) if secret else None}

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> Any:
        if state["draining"]:
            raise ServeError(503, "this worker is shutting down", "worker_draining")
        backend = by_name.get(req.model)
        if backend is None:
            raise ServeError(404, f"this worker does not serve {req.model!r}; it serves {', '.join(by_name)}", "model_not_found", "model")
        generation = await backend.open(req)
        request.state.log.update(model=req.model, request_id=req.request_id, n=req.params.n)
        return StreamingResponse(_lines(generation, heartbeat), media_type="application/x-ndjson")

    guard(app, max_body_bytes, secret, open_paths=("/health", CHALLENGE_PATH))
    app.add_middleware(AccessLogMiddleware, role="worker", quiet_paths=("/health",))
    return app


async def _lines(generation: Any, keepalive: float):
    """The generation's events as JSON lines, with keepalives while the engine is quiet."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for event in generation.events():
                await queue.put(event)
        except ServeError as exc:
            await queue.put({**exc.body(), "status": exc.status})
        except Exception as exc:
            await queue.put({**ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", "engine_error").body(), "status": 500})
        finally:
            await queue.put(end)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=keepalive)
            except asyncio.TimeoutError:
                yield '{"keepalive":true}\n'
                continue
            if item is end:
                return
            yield json.dumps(item, separators=(",", ":")) + "\n"
    finally:  # the API went away, or the stream ended: stop generating either way
        task.cancel()
        generation.cancel()
