"""`vicuna apply-delta` as a function: TARGET = BASE + DELTA, DELTA = TARGET - BASE (`make`), or
a LoRA adapter merged into its base (`lora`) — streamed tensor by tensor.

Memory holds about one tensor per input and the tensor being written, whatever the model size:
inputs are read one tensor at a time (shards.py), arithmetic runs in fp32 slabs (plan.py), and
each result goes straight into a safetensors shard whose layout was planned up front (writer.py).
The output is built in a temporary directory beside the target and renamed into place only when
complete (and verified, with `check`), so an interrupted run never leaves something that looks
like a model; the temp dir of a killed run is removed by the next run for the same target.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..core import console
from ..core.errors import VicunaError
from ..core.models import resolve
from ..core.store import atomic_dir, ensure_writable, human_size
from .check import sha256_file, verify
from .config import DeltaConfig
from .lora import plan_adapter, read_adapter_config, resolve_adapter
from .plan import DTYPES, VOCAB_TENSOR, Step, Tally, compute, plan_arithmetic, plan_merge
from .progress import Progress
from .shards import WeightSource
from .writer import ShardWriter, parse_size

try:
    import fcntl
except ImportError:  # not POSIX: no detection of temp dirs left by killed runs
    fcntl = None

MANIFEST = "vicuna-manifest.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
PAST = {"add": "added", "subtract": "subtracted", "copy": "copied", "keep": "kept",
        "replace": "replaced", "merge": "merged"}
TORCH_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}




@dataclass
class DeltaResult:
    operation: str
    output: Path
    inputs: dict[str, Path]
    counts: dict[str, int]
    resized: list[str]
    skipped: list[str]
    files: dict[str, tuple[str, int]]  # shard -> (sha256, bytes)
    bytes_written: int
    seconds: float
    inexact: Optional[int]  # make-delta: values that would not come back bit-exactly
    check: Optional[str]


@dataclass
class _Job:
    other: WeightSource  # the delta, the target (make) or the adapter (lora)
    steps: list[Step]
    skipped: list[str]
    inputs: dict[str, Path]
    config_from: Path
    tokenizer_from: Path
    patch: dict[str, object]  # changes to the copied config.json


def run(config: DeltaConfig) -> DeltaResult:
    started = time.perf_counter()
    output = config.output.expanduser()
    if output.exists() and not output.is_dir():
        raise VicunaError(f"{output} exists and is not a directory", hint="choose another -o")
    if output.exists() and not config.overwrite:
        raise VicunaError(f"{output} already exists",
                          hint="pass --overwrite to replace it (the old one stays until the new one is complete)")
    ensure_writable(output.parent)  # before the weights are read
    base_dir = resolve(config.base).path
    base = WeightSource(base_dir, "base")
    job = _plan(config, base, base_dir)
    _refuse_input_as_output(output, job.inputs)
    total = sum(s.out.nbytes for s in job.steps)
    _require_free_space(output, total)
    console.info(f"{config.operation}: {len(job.steps)} tensors, {human_size(total)} to write to {output}")
    tally = Tally()
    with _building(output) as tmp:
        writer = ShardWriter(tmp, [s.out for s in job.steps], parse_size(config.max_shard_size))
        try:
            with Progress(config.operation, len(job.steps), total) as progress, _one_torch_thread():
                for step in job.steps:
                    writer.write(step.name, compute(step, base, job.other, tally))
                    progress.advance(step.out.nbytes)
            files = writer.finish()
        finally:
            writer.abort()
        _copy_side_files(tmp, job.config_from, job.tokenizer_from, job.patch)
        verdict = verify(tmp, config.check, writer.weight_map) if config.check else None
        counts = {PAST[a]: n for a in PAST if (n := sum(s.action == a for s in job.steps))}
        _write_manifest(tmp, config, job.inputs, counts, files)
    resized = [f"{s.name}: {base.tensors[s.name].shape[0]} -> {s.out.shape[0]} rows "
               f"(new rows from the {job.other.label})" for s in job.steps if s.out.shape != base.tensors[s.name].shape]
    return DeltaResult(config.operation, output, job.inputs, counts, resized, job.skipped, files, total,
                       time.perf_counter() - started, tally.inexact if config.make else None, verdict)


def _plan(config: DeltaConfig, base: WeightSource, base_dir: Path) -> _Job:
    fixed = DTYPES.get(config.dtype)
    patch: dict[str, object] = {"dtype": TORCH_NAMES[fixed]} if fixed else {}
    if config.lora:
        adapter_dir = resolve_adapter(config.lora)
        adapter = WeightSource(adapter_dir, "adapter")
        steps = plan_merge(base, adapter, plan_adapter(base, adapter, read_adapter_config(adapter_dir)),
                           lambda w: fixed or w.dtype)
        grown = [s.out.shape[0] for s in steps if VOCAB_TENSOR.search(s.name) and s.out.shape != base.tensors[s.name].shape]
        if grown:  # the adapter saved resized embeddings: the base's config must follow
            patch["vocab_size"] = grown[0]
        has_tokenizer = any((adapter_dir / f).is_file() for f in TOKENIZER_FILES)
        return _Job(adapter, steps, [], {"base": base_dir, "adapter": adapter_dir}, base_dir,
                    adapter_dir if has_tokenizer else base_dir, patch)
    label = "target" if config.make else "delta"
    other_dir = resolve(config.target if config.make else config.delta).path
    other = WeightSource(other_dir, label)
    if config.make:  # the delta keeps the target's precision unless --dtype says otherwise
        dtype_for = lambda b, t: fixed or t.dtype  # noqa: E731
        patch = {}  # a delta's config.json is the target's, so applying it restores the target's dtype
    else:  # the delta's config.json names the dtype of the model it reconstructs
        declared = _config_dtype(other_dir)
        dtype_for = lambda b, d: fixed or declared or b.dtype  # noqa: E731
    steps, skipped = plan_arithmetic(base, other, config.make, dtype_for)
    return _Job(other, steps, skipped, {"base": base_dir, label: other_dir}, other_dir, other_dir, patch)


def render(result: DeltaResult) -> None:
    """The summary, on stderr (stdout carries only the output path)."""
    table = Table(show_header=False, title=f"{result.operation} done", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, path in result.inputs.items():
        table.add_row(label, escape(str(path)))
    table.add_row("output", escape(str(result.output)))
    table.add_row("tensors", ", ".join(f"{n} {what}" for what, n in result.counts.items()))
    for line in result.resized:
        table.add_row("resized", escape(line))
    if result.skipped:
        table.add_row("skipped", f"{len(result.skipped)} rotary_emb.inv_freq buffer(s) (recomputed on load)")
    table.add_row("written", f"{human_size(result.bytes_written)} in {len(result.files)} shard(s), sha256 in {MANIFEST}")
    if result.inexact is not None:
        table.add_row("round trip", "exact: base + delta gives the target bit for bit" if result.inexact == 0 else
                      f"{result.inexact} value(s) will not come back bit for bit when the delta is applied "
                      "(an fp32 delta, --dtype fp32, comes closest)")
    if result.check:
        table.add_row("check", escape(result.check))
    rate = result.bytes_written / max(result.seconds, 1e-9)
    table.add_row("time", f"{result.seconds:.1f} s ({human_size(rate)}/s)")
    console.err.print(table)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Slab arithmetic is memory-bound, so a second torch thread gains little; on a shared machine
    its barrier stalls whenever the other core is busy (0.2 vs 1.4 GB/s measured here). The
    writer thread gets the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _config_dtype(root: Path) -> torch.dtype | None:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return next((d for d, n in TORCH_NAMES.items() if n == name), None)


def _refuse_input_as_output(output: Path, inputs: dict[str, Path]) -> None:
    out = output.resolve()
    for label, path in inputs.items():
        if path.resolve() == out or out in path.resolve().parents:
            raise VicunaError(f"-o {output} would replace the {label} it reads from", hint="choose another -o")


def _require_free_space(output: Path, needed: int) -> None:
    where = output.parent.resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed + (16 << 20):
        raise VicunaError(f"not enough free space in {where}: the output needs {human_size(needed)}, "
                          f"{human_size(free)} is free", hint="free some space, or write elsewhere with -o")


@contextlib.contextmanager
def _building(output: Path) -> Iterator[Path]:
    """`atomic_dir`, with a lock held on the temp dir while this run lives: a temp dir whose lock
    is free belongs to a run that was killed, and is removed."""
    if fcntl is None:
        with atomic_dir(output) as tmp:
            yield tmp
        return
    for leftover in output.parent.glob(f".{glob.escape(output.name)}.*.partial"):
        try:
            with open(leftover / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VicunaError(f"another run is writing {output} right now ({leftover})",
                              hint="wait for it to finish, or choose another -o") from None
        except FileNotFoundError:
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        console.info(f"removed {leftover}, left by an interrupted run")
    with atomic_dir(output) as tmp:
        with open(tmp / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                yield tmp
            finally:
                (tmp / ".lock").unlink(missing_ok=True)


def _copy_side_files(dst: Path, config_from: Path, tokenizer_from: Path, patch: dict[str, object]) -> None:
    """Config from one input, tokenizer from another; never Python files (no remote code)."""
    for src, names in ((config_from, CONFIG_FILES), (tokenizer_from, TOKENIZER_FILES)):
        for name in names:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    if patch and (dst / "config.json").is_file():
        config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
        for key, value in patch.items():
            keys = [key]
            if key == "dtype":  # transformers 5 writes `dtype`, older versions `torch_dtype`
                keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            config.update(dict.fromkeys(keys, value))
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_manifest(tmp: Path, config: DeltaConfig, inputs: dict[str, Path], counts: dict[str, int],
                    shards: dict[str, tuple[str, int]]) -> None:
    files = {name: {"sha256": digest, "bytes": size} for name, (digest, size) in shards.items()}
    for path in sorted(tmp.iterdir()):
        if path.name not in files and not path.name.startswith(".") and path.name != MANIFEST and path.is_file():
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "created_by": f"vicuna-cli {__version__}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "operation": config.operation,
        "config": config.model_dump(mode="json"),  # the resolved options, as the run saw them
        "inputs": {label: str(path) for label, path in inputs.items()},
        "tensors": counts,
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
