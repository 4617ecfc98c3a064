"""The controller: a registry of workers, kept fresh by heartbeats, that tells the API which worker
should answer a request.

- Workers register (address, models, batch size, queue limit) and then send a heartbeat every few
  seconds with their running/waiting counts. A worker silent for longer than `expiry` seconds is
  dropped; so is one the API reports unreachable.
- A heartbeat from an unknown worker is answered `known: false`, and the worker registers again:
  that is how a restarted controller (which keeps no state on disk) gets its registry back.
- Dispatch: live workers serving the model, least loaded first. Load = running + waiting at the
  last heartbeat + requests dispatched since, so a burst between two heartbeats still spreads.
- With a shared secret, a registering worker's address must prove it holds the secret (an HMAC
  of a fresh nonce, security.py) before it is listed: the API sends the secret to every address
  listed here, and shows its clients what those addresses answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI

from .common import AccessLogMiddleware, install_error_handlers, log_json, read_at_most
from .config import WORKER_EXPIRY
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
from .security import CHALLENGE_PATH, guard, worker_proof


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
    clock: Callable[[], float] = time.monotonic
    _ticks: Any = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.rejoined = False  # a worker registered again: this controller restarted (or lost it)

    def register(self, info: RegisterRequest) -> None:
        now = self.clock()
        # A worker restarted on the same address replaces its old entry.
        for worker_id, entry in list(self.workers.items()):
            if entry.info.address == info.address and worker_id != info.worker_id:
                del self.workers[worker_id]
        self.rejoined = self.rejoined or info.rejoin
        self.workers[info.worker_id] = _Entry(info, now, now, info.running, info.waiting, order=next(self._ticks))
        for model in info.models:
            self.gone.pop(model.name, None)

    def heartbeat(self, beat: HeartbeatRequest) -> bool:
        entry = self.workers.get(beat.worker_id)
        if entry is None:
            return False
        entry.last_seen = self.clock()
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
        now = self.clock()
        for worker_id, entry in list(self.workers.items()):
            if now - entry.last_seen > self.expiry:
                self.remove(worker_id, f"sent no heartbeat for {now - entry.last_seen:.1f} s")

    def live(self) -> list[_Entry]:
        self.sweep()
        return list(self.workers.values())

    def dispatch(self, model: str, n: int = 1, sequences: int = 1) -> list[str]:
        entries = [e for e in self.live() if any(m.name == model for m in e.info.models)]
        if not entries:
            if model in self.gone:
                when, why = self.gone[model]
                raise ServeError(503, f"no live worker serves model {model!r}: {why} ({time.time() - when:.0f} s ago)", "no_worker")
            self._check_not_registering_yet(model)
            known = sorted({m.name for e in self.workers.values() for m in e.info.models})
            raise ServeError(404, f"the model {model!r} does not exist; served: {', '.join(known) or '(none)'}", "model_not_found", "model")
        self._check_fits(model, entries, n, sequences)
        entries.sort(key=lambda e: (e.load, e.order))
        chosen = entries[0]
        chosen.dispatched += 1
        chosen.order = next(self._ticks)
        return [e.info.address for e in entries]

    def _check_not_registering_yet(self, model: str) -> None:
        """An unknown model is a 404 only once the workers have had time to register: a restarted
        controller knows no one until each live worker registers again, within one heartbeat
        (shorter than the expiry), and the model may well be served."""
        if not self.workers:
            raise ServeError(503, f"no worker has registered with the controller yet, so none serves {model!r}; retry in a few seconds",
                             "no_worker")
        age = self.clock() - self.started
        if self.rejoined and age < self.expiry:
            raise ServeError(503, f"no worker has registered model {model!r} yet: the controller restarted {age:.0f} s ago and "
                                  "workers are registering again; retry in a few seconds", "no_worker")

    @staticmethod
    def _check_fits(model: str, entries: list[_Entry], n: int, sequences: int) -> None:
        """A request larger than the workers can ever hold at once is a 400, not a 429 that a
        client would retry forever."""
        room = [e.info.max_batch_size + e.info.max_queue for e in entries]
        if n > max(room):
            raise ServeError(400, f"n={n} needs {n} sequences on one worker, but the workers serving {model!r} hold at most "
                                  f"{max(room)} at once (--max-batch-size + --max-queue); ask for fewer choices", "request_too_large", "n")
        if sequences > sum(room):
            raise ServeError(400, f"this request needs {sequences} sequences at once (prompts x n), but the workers serving "
                                  f"{model!r} hold at most {sum(room)} (--max-batch-size + --max-queue); send fewer prompts or a smaller n",
                             "request_too_large")

    def status(self) -> list[WorkerStatus]:
        now = self.clock()
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


async def verify_worker(client: Any, address: str, secret: str) -> None:
    """The address must answer the challenge with the HMAC only a holder of the secret can make."""
    import httpx

    nonce = secrets.token_hex(16)
    try:
        async with client.stream("GET", f"{address}{CHALLENGE_PATH}", params={"nonce": nonce}) as response:
            raw = await read_at_most(response, 4096)  # a proof is 64 hex digits
            status = response.status_code
    except httpx.HTTPError as exc:
        raise ServeError(403, f"the worker address {address} did not answer the challenge ({type(exc).__name__})", "worker_unverified") from None
    try:
        proof = json.loads(raw).get("proof") if status == 200 else None
    except (ValueError, AttributeError):
        proof = None
    if not isinstance(proof, str) or not secrets.compare_digest(proof, worker_proof(secret, nonce, address)):
        log_json({"role": "controller", "event": "worker_unverified", "address": address, "status": status})
        raise ServeError(403, f"the worker address {address} did not prove that it holds the shared secret; "
                              "is a vicuna worker with the same --secret listening there?", "worker_unverified")


def create_app(expiry: float = WORKER_EXPIRY, secret: str | None = None, max_body_bytes: int = 1 << 20) -> Any:
    from contextlib import asynccontextmanager

    import httpx

    registry = Registry(expiry)
    # No secret on this client: the addresses it calls have not proven anything yet.
    holder: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Any):
        holder["client"] = httpx.AsyncClient(timeout=5.0, follow_redirects=False)
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
            await holder["client"].aclose()

    app = FastAPI(title="vicuna controller", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "workers": len(registry.live())}

    @app.post("/register")
    async def register(info: RegisterRequest) -> dict[str, Any]:
        if secret:
            await verify_worker(holder["client"], info.address, secret)
        registry.register(info)
        log_json({"role": "controller", "event": "worker_registered", "worker": info.worker_id, "address": info.address,
                  "models": [m.name for m in info.models]})
        return {"ok": True, "expiry": expiry}

    @app.post("/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(beat: HeartbeatRequest) -> HeartbeatResponse:
        return HeartbeatResponse(known=registry.heartbeat(beat))

    @app.post("/deregister")
    async def deregister(beat: HeartbeatRequest) -> dict[str, Any]:
        registry.remove(beat.worker_id, "deregistered (shut down)")
        return {"ok": True}

    @app.post("/dispatch", response_model=DispatchResponse)
    async def dispatch(req: DispatchRequest) -> DispatchResponse:
        return DispatchResponse(candidates=registry.dispatch(req.model, req.n, req.sequences))

    @app.post("/report")
    async def report(req: ReportRequest) -> dict[str, Any]:
        """The API could not reach a worker: drop it now instead of at expiry."""
        for worker_id, entry in list(registry.workers.items()):
            if entry.info.address == req.address:
                registry.remove(worker_id, f"was unreachable ({req.reason})" if req.reason else "was unreachable")
        return {"ok": True}

    @app.get("/workers", response_model=list[WorkerStatus])
    async def workers() -> list[WorkerStatus]:
        """Read-only and open (like /health), so `vicuna serve status` needs no secret."""
        registry.sweep()
        return registry.status()

    guard(app, max_body_bytes, secret, open_paths=("/health", "/workers"))
    app.add_middleware(AccessLogMiddleware, role="controller", quiet_paths=("/heartbeat", "/health", "/workers", "/dispatch"))
    return app
