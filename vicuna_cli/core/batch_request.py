"""One request of core/batch.py's BatchEngine: its events (a thread-safe queue, read from a
thread or from asyncio) and its scheduling state; and the two ways `submit` refuses one.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from .errors import VicunaError
from .generate import GenerationStats, IncrementalDetokenizer, SamplingParams, StopStringFilter, TokenEvent
from .sampling import RequestSampler

if TYPE_CHECKING:
    from .batch import BatchEngine


class QueueFull(VicunaError):
    def __init__(self, max_queue: int):
        super().__init__(
            f"the request queue is full ({max_queue} waiting)",
            hint="retry later, or raise --max-queue / add workers",
        )
        self.max_queue = max_queue


class EngineStopped(VicunaError):
    def __init__(self) -> None:
        super().__init__("the generation engine is shutting down", hint="retry on another worker")


class BatchRequest:
    """One submitted prompt: its events (a thread-safe queue) and its scheduling state."""

    def __init__(self, engine: "BatchEngine", prompt_ids: list[int], params: SamplingParams):
        self.id = f"req-{uuid.uuid4().hex[:16]}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.output_ids: list[int] = []
        self.stop_token_id: int | None = None  # the stop token that ended it, if one did (PPO rollouts)
        self.exception: BaseException | None = None  # what failed it, when finish_reason is "error"
        self.finished = False
        self._arrival = time.perf_counter()
        self._cancelled = False
        self._engine = engine
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        # Scheduling state (touched by the stepping thread only).
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the KV cache
        self.pending: int | None = None  # the last sampled token, fed at the next decode step
        self.passed_over = False  # prefilling, and no chunk of it went in the last step
        self.budget = min(params.max_new_tokens, engine.context_length - len(prompt_ids))
        self.stop_ids = engine.stop_token_ids | set(params.stop_token_ids)
        self.sampler = RequestSampler(params, prompt_ids, engine.device)
        self.detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopStringFilter(params.stop)

    def cancel(self) -> None:
        """Stop generating: the request ends with finish_reason "cancelled" at the next step."""
        self._cancelled = True
        self._engine._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- delivery ------------------------------------------------------------------------------

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            waiters = list(self._waiters)
            self._cond.notify_all()
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is closed: nobody listens there any more
                pass

    def drain(self) -> list[TokenEvent]:
        """The events so far, without waiting."""
        with self._cond:
            events = list(self._events)
            self._events.clear()
        return events

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Events as they come, up to the one with a finish_reason. `timeout` bounds the wait
        for each event (TimeoutError), None waits as long as it takes."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"no event from request {self.id} within {timeout} s")
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """The same for asyncio: the engine thread wakes the loop (call_soon_threadsafe)."""
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        waiter = (loop, flag)
        with self._cond:
            self._waiters.add(waiter)
        try:
            while True:
                flag.clear()
                for event in self.drain():
                    yield event
                    if event.finish_reason is not None:
                        return
                await flag.wait()
        finally:
            with self._cond:
                self._waiters.discard(waiter)
