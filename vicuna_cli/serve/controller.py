"""The controller: a registry of workers, kept fresh by heartbeats, that tells the API which worker
should answer a request.

- Workers register (address, models, batch size, queue limit) and then send a heartbeat every few
  seconds with their running/waiting counts. A worker silent for longer than `expiry` seconds is
  dropped; so is one the API reports unreachable.
- A heartbeat from an unknown worker is answered `known: false`, and the worker registers again:
  that is how a restarted controller (which keeps no state on disk) gets its registry back.
- Dispatch: live workers serving the model, least loaded first. Load = running + waiting at the
  last heartbeat + requests dispatched since, so a burst between two heartbeats still spreads.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from .common import AccessLogMiddleware, install_error_handlers, log_json
from .protocol import (
    DispatchRequest,
    DispatchResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    ReportRequest,
    ServeError,
    WorkerStatus,
)
from .security import check_secret


@dataclass
class _Entry:
    info: RegisterRequest
    registered: float
    last_seen: float
    running: int = 0
    waiting: int = 0
    dispatched: int = 0  # sent to it since its last heartbeat
    order: int = 0  # tie-breaker: the least recently chosen first

    @property
    def load(self) -> int:
        return self.running + self.waiting + self.dispatched


@dataclass
class Registry:
    expiry: float
    workers: dict[str, _Entry] = field(default_factory=dict)
    # model -> (when its last worker went away, why): a known model with no worker is a 503, not a 404.
    gone: dict[str, tuple[float, str]] = field(default_factory=dict)
    _ticks: Any = field(default_factory=itertools.count)

    def register(self, info: RegisterRequest) -> None:
        now = time.monotonic()
        # A worker restarted on the same address replaces its old entry.
        for worker_id, entry in list(self.workers.items()):
            if entry.info.address == info.address and worker_id != info.worker_id:
                del self.workers[worker_id]
        self.workers[info.worker_id] = _Entry(info, now, now, info.running, info.waiting, order=next(self._ticks))
        for model in info.models:
            self.gone.pop(model.name, None)

    def heartbeat(self, beat: HeartbeatRequest) -> bool:
        entry = self.workers.get(beat.worker_id)
        if entry is None:
            return False
        entry.last_seen = time.monotonic()
        entry.running, entry.waiting, entry.dispatched = beat.running, beat.waiting, 0
        return True

    def remove(self, worker_id: str, why: str) -> None:
        entry = self.workers.pop(worker_id, None)
        if entry is None:
            return
        log_json({"role": "controller", "event": "worker_removed", "worker": worker_id, "address": entry.info.address, "why": why})
        served = {m.name for e in self.workers.values() for m in e.info.models}
        for model in entry.info.models:
            if model.name not in served:
                self.gone[model.name] = (time.time(), f"its last worker ({entry.info.address}) {why}")

    def sweep(self) -> None:
        now = time.monotonic()
        for worker_id, entry in list(self.workers.items()):
            if now - entry.last_seen > self.expiry:
                self.remove(worker_id, f"sent no heartbeat for {now - entry.last_seen:.1f} s")

    def live(self) -> list[_Entry]:
        self.sweep()
        return list(self.workers.values())

    def dispatch(self, model: str) -> list[str]:
        entries = [e for e in self.live() if any(m.name == model for m in e.info.models)]
        if not entries:
            if model in self.gone:
                when, why = self.gone[model]
                raise ServeError(503, f"no live worker serves model {model!r}: {why} ({time.time() - when:.0f} s ago)", "no_worker")
            known = sorted({m.name for e in self.workers.values() for m in e.info.models})
            raise ServeError(404, f"the model {model!r} does not exist; served: {', '.join(known) or '(none)'}", "model_not_found", "model")
        entries.sort(key=lambda e: (e.load, e.order))
        chosen = entries[0]
        chosen.dispatched += 1
        chosen.order = next(self._ticks)
        return [e.info.address for e in entries]

    def status(self) -> list[WorkerStatus]:
        now = time.monotonic()
        return [
            WorkerStatus(
                worker_id=worker_id,
                address=e.info.address,
                models=e.info.models,
                max_batch_size=e.info.max_batch_size,
                max_queue=e.info.max_queue,
                running=e.running,
                waiting=e.waiting,
                heartbeat_age=round(now - e.last_seen, 2),
                registered_for=round(now - e.registered, 2),
            )
            for worker_id, e in sorted(self.workers.items(), key=lambda kv: kv[1].info.address)
        ]


def create_app(expiry: float = 6.0, secret: str | None = None) -> Any:
    from contextlib import asynccontextmanager


    registry = Registry(expiry)

    @asynccontextmanager
    async def lifespan(app: Any):
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(max(expiry / 4, 0.05))
                registry.sweep()

        task = asyncio.create_task(sweeper())
        log_json({"role": "controller", "event": "started", "expiry_s": expiry})
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="vicuna controller", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    install_error_handlers(app)

    def guard(request: Request) -> None:
        check_secret(request.headers, secret)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "workers": len(registry.live())}

    @app.post("/register")
    async def register(info: RegisterRequest, request: Request) -> dict[str, Any]:
        guard(request)
        registry.register(info)
        log_json({"role": "controller", "event": "worker_registered", "worker": info.worker_id, "address": info.address,
                  "models": [m.name for m in info.models]})
        return {"ok": True, "expiry": expiry}

    @app.post("/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(beat: HeartbeatRequest, request: Request) -> HeartbeatResponse:
        guard(request)
        return HeartbeatResponse(known=registry.heartbeat(beat))

    @app.post("/deregister")
    async def deregister(beat: HeartbeatRequest, request: Request) -> dict[str, Any]:
        guard(request)
        registry.remove(beat.worker_id, "deregistered (shut down)")
        return {"ok": True}

    @app.post("/dispatch", response_model=DispatchResponse)
    async def dispatch(req: DispatchRequest, request: Request) -> DispatchResponse:
        guard(request)
        return DispatchResponse(candidates=registry.dispatch(req.model))

    @app.post("/report")
    async def report(req: ReportRequest, request: Request) -> dict[str, Any]:
        """The API could not reach a worker: drop it now instead of at expiry."""
        guard(request)
        for worker_id, entry in list(registry.workers.items()):
            if entry.info.address == req.address:
                registry.remove(worker_id, f"was unreachable ({req.reason})" if req.reason else "was unreachable")
        return {"ok": True}

    @app.get("/workers", response_model=list[WorkerStatus])
    async def workers() -> list[WorkerStatus]:
        """Read-only and open (like /health), so `vicuna serve status` needs no secret."""
        registry.sweep()
        return registry.status()

    app.add_middleware(AccessLogMiddleware, role="controller", quiet_paths=("/heartbeat", "/health", "/workers", "/dispatch"))
    return app
