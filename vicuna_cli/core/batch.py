"""Continuous batching: many requests share one model, joining and leaving between decode steps.

    engine = BatchEngine(model, tokenizer, context_length, max_batch_size=8, max_queue=64)
    engine.start()                                  # a daemon scheduler thread
    request = engine.submit(prompt_ids, SamplingParams(temperature=0, max_new_tokens=64))
    for event in request.events():                  # or `async for event in request.aevents()`
        print(event.text, end="")                   # the last event has a finish_reason

Each `step()` (the thread loops over it; tests call it directly):
  1. finishes cancelled requests (their slot is free at once);
  2. admits waiting requests while slots are free (FIFO);
  3. prefills chunks of the admitted prompts in one ragged forward (native models: the weights
     are read once for all of them, which is what a CPU prefill of a short prompt is bound by),
     within a per-step budget of `prefill_chunk` tokens that the decoding rows come out of first.
     Shortest remaining prompt first: a short prompt that arrives while a long one is being
     prefilled is prefilled in the next step, and the long prompt's chunk waits when it does not
     fit beside it (a chunk that ends its prompt may overshoot the budget; the first chunk of a
     step always goes, so every prompt progresses). A chunk's cost grows with the keys its
     attention reads, so chunks get shorter deep into a prompt (see `chunk_length`): a step
     costs about the same at position 8,000 as at 0, and the running streams keep decoding
     every step. Chunk boundaries depend only on the prompt (and on what the prefix cache
     supplied), so a request's output does not depend on what else is in the batch;
  4. decodes one token for every running request in one batched forward.

When the last sequence that needed a long KV cache leaves, the cache shrinks back and the freed
heap is handed back to the OS (`kv_cache.SlotKVCache.shrink`, `trim_heap`).

How a model runs the prefills and decode steps (one batched forward on the native Llama model,
one forward per request otherwise) is core/runners.py; a request's events and state are
core/batch_request.py.

Sampling, detokenizing, stop strings and stats are per request and shared with the batch-1
`generate.Engine`, which runs this engine with one slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Sequence

from . import console
from .batch_request import BatchRequest, EngineStopped, QueueFull
from .errors import VicunaError
from .generate import SamplingParams, TokenEvent, TokenLogprob, TokenPieces, check_prompt, eos_token_ids
from .prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_CACHE_BYTES
from .runners import NativeRunner, make_runner
from .sampling import top_logprobs

__all__ = ["BatchEngine", "BatchRequest", "QueueFull", "EngineStopped", "TokenEvent", "TokenLogprob"]

DEFAULT_PREFILL_CHUNK = 256
# A prefill chunk's cost in "tokens at position 0": n tokens from position p cost about
# n * (1 + p / PREFILL_DEPTH_SCALE), the second term being attention over the p cached keys
# (SmolLM2-135M on this CPU: a 256-token chunk took ~0.35 s at position 0 and several seconds at
# 7,900, where a 32-token one took ~0.25 s; the attention scores of a chunk are n x (p + n)).
PREFILL_DEPTH_SCALE = 1024
MIN_PREFILL_CHUNK = 32  # below this, reading the weights once per chunk dominates


def chunk_length(prefill_chunk: int, position: int) -> int:
    """The length of the prefill chunk that starts at `position`: about `prefill_chunk` tokens'
    cost. A function of the position only, so a prompt's chunk boundaries do not depend on the
    batch (batched output equals batch-1 output)."""
    scaled = prefill_chunk * PREFILL_DEPTH_SCALE // (PREFILL_DEPTH_SCALE + position)
    return max(min(prefill_chunk, MIN_PREFILL_CHUNK), scaled)


def chunk_cost(length: int, position: int) -> float:
    return length * (PREFILL_DEPTH_SCALE + position + length / 2) / PREFILL_DEPTH_SCALE


# ---------------------------------------------------------------------------------------------
# The engine


class BatchEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        context_length: int | None = None,
        *,
        max_batch_size: int,
        max_queue: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        threads: int | None = None,
    ):
        """`max_batch_size`, `max_queue`: no defaults here, the caller's config owns them (serve's
        WorkerConfig, PPO's rollout settings; chat's batch of one). `threads`: a fixed torch
        thread count (--threads); None follows the free CPUs while running (core/threads.py,
        also $VICUNA_THREADS)."""
        from .threads import ThreadPolicy

        if max_batch_size < 1:
            raise VicunaError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise VicunaError(f"max_queue must be 0 or more, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.threads = ThreadPolicy(threads)
        self.stop_token_ids = eos_token_ids(model, tokenizer)
        self.runner = make_runner(model, max_batch_size, self.context_length, prefix_cache_bytes)
        self.batched = isinstance(self.runner, NativeRunner)
        self._pieces: TokenPieces | None = None
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []  # admitted: prefilling or decoding
        self._free_slots = set(range(max_batch_size))
        self._lock = threading.Lock()  # guards _waiting and _accepting (submit is thread-safe)
        self._step_lock = threading.Lock()  # one step at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        self._accepting = True

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- public API ----------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> BatchRequest:
        """Queue a prompt (thread-safe). Raises ContextOverflow, QueueFull or EngineStopped."""
        check_prompt(prompt_ids, self.context_length)
        request = BatchRequest(self, list(prompt_ids), params)
        with self._lock:
            if not self._accepting:
                raise EngineStopped()
            if len(self._running) + len(self._waiting) >= self.max_batch_size + self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(request)
        self._wake.set()
        return request

    def start(self) -> None:
        """Run `step` in a daemon thread until `stop`. Calling it again does nothing."""
        with self._lock:
            self._accepting = True
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop_thread = False
            self._thread = threading.Thread(target=self._loop, name="vicuna-batch-engine", daemon=True)
            self._thread.start()

    def stop(self, cancel_running: bool = True) -> None:
        """Refuse new requests; cancel the queued and running ones (or, with cancel_running=False,
        let them finish), then end the thread."""
        with self._lock:
            self._accepting = False
            pending = list(self._waiting) + list(self._running)
        if cancel_running:
            for request in pending:
                request.cancel()
        thread = self._thread
        if thread is not None:
            self._stop_thread = True
            self._wake.set()
            thread.join()
            self._thread = None
        else:
            while self.step():
                pass

    def step(self) -> bool:
        """One iteration: reap cancelled requests, admit, prefill, one decode step for all
        running. Returns False when there was nothing to do."""
        import torch

        # inference_mode: no autograd graph. Without it, a weight that requires grad (a norm's)
        # chains every step's activations to the KV cache through its in-place writes, and
        # the process grew by ~20 MB per decode step (batch 16) until the machine swapped.
        with self._step_lock, torch.inference_mode():
            self.threads.tick()  # in the computing thread: OpenMP's count is per OS thread
            try:
                busy = self._reap()
                self._admit()
                busy |= self._prefill()
                self._compact()  # after the prefill: the prompts it finished decode in this step
                busy |= self._decode()
                return busy or bool(self._running)
            except Exception as exc:  # a bug in the scheduler itself: fail everyone, keep running
                console.warn(f"batch engine step failed: {exc!r}")
                for request in list(self._running):
                    self._fail(request, exc)
                return True

    def reap(self) -> None:
        """Finish cancelled requests now (frees their slots) without running the model."""
        import torch

        with self._step_lock, torch.inference_mode():
            self._reap()

    # -- scheduling ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            busy = self.step()
            if self._stop_thread and not self._running and not self._waiting:
                return
            if not busy:
                self._wake.wait(0.5)

    def _reap(self) -> bool:
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        cancelled += [r for r in self._running if r.cancelled]
        for request in cancelled:
            self._finish(request, "cancelled")
        return bool(cancelled)

    def _compact(self) -> None:
        """Keep the decoding sequences in the lowest slots. A decode step's rows are then one slice
        of the KV cache (a view); rows with a gap between them are gathered, which copies every
        row's keys and values in every layer at every step. A move copies one sequence once.
        Prompts are admitted to the highest free slots, so a decoding sequence usually moves
        into a free slot; when a prompt still being prefilled holds the slot (shortest prompt
        first: a later, shorter prompt finishes its prefill first), the two swap."""
        if not self.batched:
            return
        decoding = [r for r in self._running if r.prefilled >= len(r.prompt_ids)]
        misplaced = sorted((r for r in decoding if r.slot >= len(decoding)), key=lambda r: r.slot)
        if not misplaced:
            return
        owner = {r.slot: r for r in self._running}
        targets = [s for s in range(len(decoding)) if s not in owner or owner[s].prefilled < len(owner[s].prompt_ids)]
        for request, target in zip(misplaced, targets):
            source, prefilling = request.slot, owner.get(target)
            if prefilling is None:
                self.runner.move(source, target)
                self._free_slots.remove(target)
                self._free_slots.add(source)
            else:
                self.runner.swap(source, target)
                prefilling.slot = source
            request.slot = target

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            while self._waiting and self._free_slots:
                request = self._waiting.popleft()
                request.slot = max(self._free_slots)  # prompts start high, out of the decoding rows' way
                self._free_slots.remove(request.slot)
                request.stats.queue_time = time.perf_counter() - request._arrival
                self._running.append(request)
                admitted.append(request)
        for request in admitted:
            try:
                request.prefilled = self.runner.reuse_prefix(request.slot, request.prompt_ids)
            except Exception as exc:
                self._fail(request, exc)
                continue
            request.stats.cached_tokens = request.prefilled

    def _prefill(self) -> bool:
        """Prompt chunks within this step's budget (module docstring, step 3), in ragged forwards
        (again while the budget lasts, when a prompt has chunks left)."""
        budget = self.prefill_chunk - sum(1 for r in self._running if r.pending is not None)
        did, served = False, set()
        while budget > 0 or not did:
            batch: list[tuple[BatchRequest, list[int]]] = []
            prefilling = [r for r in self._running if r.prefilled < len(r.prompt_ids)]
            # A prompt passed over in the last step goes first: shorter prompts arriving every
            # step would otherwise hold a long one back for ever.
            order = sorted(prefilling, key=lambda r: (not r.passed_over, len(r.prompt_ids) - r.prefilled, r._arrival))
            for request in order:
                start = request.prefilled
                chunk = request.prompt_ids[start : start + chunk_length(self.prefill_chunk, start)]
                cost = chunk_cost(len(chunk), start)
                ends = start + len(chunk) == len(request.prompt_ids)
                if (did or batch) and not (cost <= budget or (ends and budget > 0)):
                    continue  # waits for a later step: a shorter prompt (or decoding) came first
                batch.append((request, chunk))
                budget -= cost
            if not batch:
                break
            did = True
            served.update(id(r) for r, _ in batch)
            done, rows = [], []
            for request, chunk, logits in self._prefill_forward(batch):
                request.prefilled += len(chunk)
                if request.prefilled == len(request.prompt_ids):
                    done.append(request)
                    rows.append(logits)
            if done:
                import torch

                self._sample(done, torch.cat(rows))
        for request in self._running:
            request.passed_over = request.prefilled < len(request.prompt_ids) and id(request) not in served
        return did

    def _prefill_forward(self, batch: list[tuple[BatchRequest, list[int]]]) -> list[tuple[BatchRequest, list[int], Any]]:
        """(request, chunk, next-token logits [1, vocab]) for the chunks that went through; when
        the ragged forward fails, each chunk is retried alone so that only a request that
        breaks the model on its own fails (a chunk rewrites the same cache positions)."""
        try:
            logits = self.runner.prefill_many([(r.slot, chunk, r.prefilled) for r, chunk in batch])
            return [(r, chunk, logits[i : i + 1]) for i, (r, chunk) in enumerate(batch)]
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0][0], exc)
                return []
        passed = []
        for request, chunk in batch:
            try:
                passed.append((request, chunk, self.runner.prefill(request.slot, chunk, request.prefilled)))
            except Exception as exc:
                self._fail(request, exc)
        return passed

    def _decode(self) -> bool:
        rows = sorted((r for r in self._running if r.pending is not None), key=lambda r: r.slot)
        if not rows:
            return False
        try:
            logits = self.runner.decode([r.slot for r in rows], [r.pending for r in rows])
        except Exception as exc:
            for request in rows:
                self._fail(request, exc)
            return True
        self._sample(rows, logits)
        return True

    def _sample(self, rows: list[BatchRequest], logits: Any) -> None:
        """Pick each row's next token from logits [len(rows), vocab] and hand it on."""
        greedy = [i for i, r in enumerate(rows) if r.sampler.is_plain_greedy]
        chosen: list[int | None] = [None] * len(rows)
        if greedy:  # one argmax for all plain-greedy rows, in fp32: the same pick (bf16 -> fp32 is
            # exact), and torch's bf16 argmax over SmolLM2's 49,152 logits took 173 us, fp32 50 us
            picks = (logits[greedy] if len(greedy) < len(rows) else logits).float().argmax(dim=-1).tolist()
            for i, token in zip(greedy, picks):
                chosen[i] = token
        for i, request in enumerate(rows):
            try:
                if chosen[i] is None:
                    chosen[i] = request.sampler.pick(logits[i : i + 1])
                logprobs = None
                if request.params.logprobs:
                    logprobs = self._logprobs(logits[i : i + 1], chosen[i], request.params.top_logprobs)
                self._accept(request, chosen[i], logprobs)
            except Exception as exc:
                self._fail(request, exc)

    def _logprobs(self, logits: Any, token: int, top_n: int) -> list[TokenLogprob]:
        if self._pieces is None:
            self._pieces = TokenPieces(self.tokenizer)
        (logprob, alternatives), = top_logprobs(logits, [token], top_n)

        def entry(token_id: int, value: float, top: list[TokenLogprob]) -> TokenLogprob:
            text, raw = self._pieces(token_id)
            return TokenLogprob(token_id, text, value, raw, top)

        return [entry(token, logprob, [entry(t, v, []) for t, v in alternatives])]

    def _accept(self, request: BatchRequest, token: int, logprobs: list[TokenLogprob] | None) -> None:
        """Stop tokens, detokenizing, stop strings and the length budget for one new token."""
        stats = request.stats
        if stats.time_to_first_token is None:
            stats.time_to_first_token = time.perf_counter() - request._arrival
        request.pending = None
        if token in request.stop_ids:  # the stop token itself is not part of the answer
            request.stop_token_id = token
            self._finish(request, "stop")
            return
        request.output_ids.append(token)
        request.sampler.observe(token)
        text = request.stops.feed(request.detok.push(token))
        if request.stops.stopped or request.sampler.grammar_complete:  # grammar: the response_format value is whole
            self._finish(request, "stop", text, [token], logprobs)
        elif len(request.output_ids) >= request.budget:
            self._finish(request, "length", text, [token], logprobs)
        else:
            request.pending = token
            request._push(TokenEvent(text, [token], logprobs))

    def _finish(
        self,
        request: BatchRequest,
        reason: str,
        text: str = "",
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        if request.finished:
            return
        if reason != "error" and not request.stops.stopped:  # what the hold-back kept, minus a half character
            text += request.stops.feed(request.detok.flush())
            text += request.stops.flush()
        request.finished = True
        request.pending = None
        stats = request.stats
        stats.finish_reason = reason
        stats.output_tokens = len(request.output_ids)
        stats.total_time = time.perf_counter() - request._arrival
        if request in self._running:
            self._running.remove(request)
        if request.slot is not None:
            if reason != "error":
                try:
                    self.runner.remember(request.slot, request.prompt_ids + request.output_ids)
                except Exception as exc:  # only a lost cache entry: the request itself is done
                    console.warn(f"prefix cache: could not store a finished sequence: {exc!r}")
            self.runner.release(request.slot)
            self._free_slots.add(request.slot)
            request.slot = None
        request._push(TokenEvent(text, token_ids or [], logprobs, reason, error))

    def _fail(self, request: BatchRequest, exc: BaseException) -> None:
        request.exception = exc
        message = str(exc).strip() or type(exc).__name__
        self._finish(request, "error", error=message)
