"""`clean`: inputs → steps (over worker processes) → de-duplication → one atomic output + report.

Records stream through: the parent reads a chunk, hands it to a worker, and writes results back
in input order from a bounded window of chunks in flight, so memory stays flat as the input grows
and the output is identical for any --workers. Only the de-duplication digests (16 bytes per kept
conversation) and the length list grow with the input.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

from pydantic import Field, field_validator

from ..core import console
from ..core.config import CommandConfig
from ..core.errors import VicunaError, unknown_choice
from ..core.store import ensure_writable, remove_stale_partials
from .formats import InputFile, Raw, RecordWriter, output_format
from .report import Progress, Report
from .steps import StepOptions, known_languages, load_blocklist, process_chunk

CHUNK_SIZE = 32  # records per task: small enough to keep the window's memory low


class CleanConfig(CommandConfig):
    inputs: list[str] = Field(min_length=1)
    output: Path
    format: Optional[Literal["json", "jsonl"]] = None
    input_format: Literal["auto", "sharegpt", "openai", "alpaca", "gpt4all", "oasst1"] = "auto"
    oasst_paths: Literal["best", "all"] = "best"
    overwrite: bool = False
    strict: bool = False
    html: bool = True
    empty: bool = True
    roles: bool = True
    dedup: bool = True
    split: bool = True
    min_turns: int = Field(1, ge=0)
    min_chars: int = Field(16, ge=0)
    blocklist: list[Path] = []
    blocklist_preset: Optional[str] = None
    lang: Optional[str] = None
    model: Optional[str] = None
    template: Optional[str] = None
    trust_remote_code: bool = False  # the -m model's own tokenizer code runs only when True
    max_length: int = Field(2048, ge=8)
    workers: int = Field(0, ge=0)
    report: Optional[Path] = None

    @field_validator("lang")
    @classmethod
    def _lang_codes(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        codes = [c.strip().lower() for c in value.split(",") if c.strip()]
        if not codes:
            raise ValueError("give language codes, e.g. --lang en,ko")
        return ",".join(codes)


def worker_count(requested: int) -> int:
    """--workers 0 means one per CPU this process may run on."""
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_token_counter(model: str, template: Optional[str], *, trust_remote_code: bool = False):
    """The tokenizer of `model` (no weights) and its template, as a TokenCounter.

    With a tokenizer.json it is read by `tokenizers` directly (core/tokenizer.py renders chat
    templates the way transformers does): importing transformers would pull in torch, which
    cost ~5 s and ~400 MB per run here. Other tokenizers go through AutoTokenizer.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes; avoid fork warnings
    from ..core import models
    from ..core.templates import template_for_model
    from .split import TokenCounter

    resolved = models.resolve(model)
    path, backend = resolved.path, None
    try:
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            from ..core.tokenizer import FastTokenizer

            tokenizer, backend = FastTokenizer(path), Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            from ..core.hf import load_pretrained

            tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    except VicunaError:
        raise
    except Exception as exc:
        raise VicunaError(f"could not load the tokenizer of {path}: {str(exc).splitlines()[0][:300]}") from exc
    return TokenCounter(tokenizer, template_for_model(tokenizer, template or resolved.template), backend)


# ---------------------------------------------------------------------------------------------
# Ordered parallel map over chunks


_STATE: dict[str, Any] = {}
JOIN_SECONDS = 10.0  # how long a worker told to stop may take before it is killed


def _worker_main(tasks: Any, results: Any, state: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    if hasattr(signal, "pthread_sigmask"):  # forked with SIGINT held (OrderedPool): ignored now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _STATE.update(state)
    while (item := tasks.get()) is not None:
        fn, task = item
        try:
            reply: tuple[bool, Any] = (True, fn(task))
        except BaseException as exc:  # re-raised in the parent, as Pool does
            reply = (False, exc)
        try:
            results.send(reply)
        except Exception as exc:  # an exception (or result) that does not pickle
            results.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Defer SIGINT in this thread (POSIX); a pending one is delivered on leaving."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _died(proc: Any) -> VicunaError:
    code = proc.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
    return VicunaError(f"a cleaning worker process (pid {proc.pid}) {how} before returning its chunk",
                       hint="if the system ran out of memory, use fewer workers (-j); -j 1 runs in one process")


class OrderedPool:
    """`map(fn, tasks)` yields fn(task) in task order, with at most 2 tasks per worker in flight.

    Each worker has its own task queue and result pipe, and tasks go round-robin, so results are
    read back in order and memory stays flat however long the input. Nothing is shared between
    workers: multiprocessing.Pool shares one task queue whose lock a dying worker can take with
    it, and its terminate() then waits on that lock forever (issue #18: `data clean` hung on
    invalid JSON in 6 of 35 runs). A dead worker is noticed through its sentinel and reported;
    shutdown after an error kills the workers and joins them with a bound.
    With one worker everything runs in this process. Create it before any progress thread
    starts: workers are forked where fork exists.
    """

    def __init__(self, workers: int, state: dict[str, Any]):
        self.workers = workers
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: list[Any] = []
        if workers <= 1:
            _STATE.update(state)
            return
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # Ctrl-C is held back while the workers start: a KeyboardInterrupt raised between a fork
        # and `Process.start` recording the child would leave a worker nobody stops, holding the
        # command's stdout/stderr open and waiting on its queue forever (a hang seen under load).
        # It is delivered as soon as every started worker is known (and then stopped).
        try:
            with _sigint_held():
                for _ in range(workers):
                    tasks, (reader, writer) = ctx.Queue(), ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker_main, args=(tasks, writer, state), daemon=True)
                    self._tasks.append(tasks)
                    self._results.append(reader)
                    self._procs.append(proc)
                    proc.start()
                    writer.close()  # only the worker writes: its death then reads as EOF here
        except BaseException:  # including the Ctrl-C delivered on leaving the block
            self._stop(graceful=False)
            raise

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if not self._procs:
            yield from map(fn, tasks)
            return
        in_flight: deque[int] = deque()  # the worker of each task sent, in task order
        for n, task in enumerate(tasks):
            worker = n % self.workers
            self._tasks[worker].put((fn, task))
            in_flight.append(worker)
            while len(in_flight) > 2 * self.workers:
                yield self._result(in_flight.popleft())
        while in_flight:
            yield self._result(in_flight.popleft())

    def _result(self, worker: int) -> Any:
        conn, proc = self._results[worker], self._procs[worker]
        multiprocessing.connection.wait([conn, proc.sentinel])
        if not conn.poll():
            raise _died(proc)
        try:
            ok, value = conn.recv()
        except (EOFError, OSError):
            raise _died(proc) from None
        if not ok:
            raise value
        return value

    def _stop(self, graceful: bool) -> None:
        for tasks in self._tasks:
            if graceful:
                tasks.put(None)
        for proc in self._procs:
            if not graceful and proc.pid is not None:
                proc.kill()
        for proc in self._procs:
            if proc.pid is None:
                continue
            proc.join(JOIN_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_SECONDS)
        for tasks in self._tasks:
            tasks.cancel_join_thread()  # undelivered tasks of killed workers must not block exit
            tasks.close()
        for conn in self._results:
            conn.close()

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._stop(graceful=exc_type is None)
        _STATE.clear()


def chunked(inputs: list[InputFile], oasst_paths: str = "best") -> Iterator[list[tuple[Raw, str]]]:
    chunk: list[tuple[Raw, str]] = []
    for inp in inputs:
        for raw in inp.conversation_records(oasst_paths):
            chunk.append((raw, inp.format))
            if len(chunk) >= CHUNK_SIZE:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def open_inputs(paths: list[str], input_format: str, formats: Optional[dict[str, str]] = None,
                detect: Optional[Callable[[Any, str], str]] = None) -> list[InputFile]:
    opened: list[InputFile] = []
    try:
        for path in paths:
            opened.append(InputFile(path, input_format, formats, detect))
    except BaseException:
        for inp in opened:
            inp.close()
        raise
    return opened


# ---------------------------------------------------------------------------------------------
# clean


def _clean_chunk(chunk: list[tuple[Raw, str]]) -> list:
    return process_chunk(chunk, _STATE["opts"], _STATE["splitter"])


def check_output(output: Path, overwrite: bool, inputs: list[str]) -> None:
    if output.is_dir():
        raise VicunaError(f"output {output} is a directory", hint="give a file name ending in .json or .jsonl")
    if output.exists() and not overwrite:
        raise VicunaError(f"output {output} already exists", hint="pass --overwrite to replace it")
    for path in inputs:
        if path != "-" and Path(path).exists() and output.exists() and Path(path).samefile(output):
            raise VicunaError(f"output {output} is also an input", hint="write the cleaned data to a new file")


def strict_check(result: Any, strict: bool) -> None:
    if result.dropped == "read" and strict:
        raise VicunaError(
            f"{result.where} has the wrong shape: {result.reason}",
            hint="fix or remove it, or run without --strict to skip and count such records",
        )


def clean(config: CleanConfig) -> Report:
    started = time.monotonic()
    fmt = output_format(config.output, config.format)
    check_output(config.output, config.overwrite, config.inputs)
    ensure_writable(config.output.parent)  # before the tokenizer loads and the input is read
    if config.report:
        ensure_writable(config.report.parent, "report")
    remove_stale_partials(config.output, console.info)
    langs: tuple[str, ...] = ()
    if config.lang:
        langs = tuple(config.lang.split(","))
        known = known_languages()
        for code in langs:
            if code not in known:
                raise unknown_choice("language code for --lang", code, known)
    opts = StepOptions(
        html=config.html, empty=config.empty, roles=config.roles, min_turns=config.min_turns,
        min_chars=config.min_chars, blocklist=load_blocklist(config.blocklist, config.blocklist_preset),
        langs=langs, dedup=config.dedup,
    )
    splitter = None
    if config.model:
        from .split import Splitter

        splitter = Splitter(load_token_counter(config.model, config.template, trust_remote_code=config.trust_remote_code),
                            config.max_length, config.split)
    elif config.split and (config.template or "max_length" in config.model_fields_set):
        raise VicunaError("splitting to --max-length needs the model's tokenizer", hint="pass -m MODEL")
    report = Report(
        {"html": opts.html, "empty": opts.empty, "roles": opts.roles, "length": bool(opts.min_turns or opts.min_chars),
         "blocklist": bool(opts.blocklist), "lang": bool(langs), "dedup": opts.dedup, "split": splitter is not None},
        unit="tokens" if splitter else "characters",
    )
    inputs = open_inputs(config.inputs, config.input_format)
    write_atomically(config.output, fmt, inputs, report, config.report, started, "no conversation survived cleaning",
                     lambda writer: _run(config, opts, splitter, inputs, writer, report))
    return report


def write_atomically(output: Path, fmt: str, inputs: list[InputFile], report: Optional[Report],
                     report_path: Optional[Path], started: float, empty_warning: str,
                     body: Callable[[RecordWriter], None]) -> Optional[Report]:
    """Run `body` into a temp file that becomes `output` only when it completed; then the report."""
    writer = None
    try:
        if report is not None:
            report.inputs = [{"path": inp.name, "container": inp.container, "format": inp.format} for inp in inputs]
        writer = RecordWriter(output, fmt)
        body(writer)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        for inp in inputs:
            inp.close()
    if report is not None:
        report.seconds = time.monotonic() - started
        if report_path:
            report.save(report_path)
    if not writer.count:
        console.warn(f"{empty_warning}; {output} holds no records")
    return report


def _run(config: CleanConfig, opts: StepOptions, splitter: Any, inputs: list[InputFile],
         writer: RecordWriter, report: Report) -> None:
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    total = None if any(inp.size is None for inp in inputs) else sum(inp.size for inp in inputs)
    records = 0
    with OrderedPool(worker_count(config.workers), {"opts": opts, "splitter": splitter}) as pool, \
            Progress("clean", total) as progress:
        for results in pool.map(_clean_chunk, chunked(inputs, config.oasst_paths)):
            for result in results:
                records += 1
                strict_check(result, config.strict)
                if opts.dedup and result.dropped in (None, "split"):
                    if result.id in seen_ids:
                        result.dropped, result.reason = "dedup", "same id"
                    elif result.key is not None and result.key in seen_keys:
                        result.dropped, result.reason = "dedup", "same first exchange"
                    elif result.dropped is None:
                        seen_ids.add(result.id)
                        if result.key is not None:
                            seen_keys.add(result.key)
                report.add(result)
                if result.dropped is None:
                    for piece in result.pieces:
                        writer.write(piece)
            progress.update(sum(inp.read_bytes for inp in inputs), records)
