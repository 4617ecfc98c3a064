"""Preemption-proof checkpoints under RUN_DIR/checkpoints/.

A checkpoint is written into a temp dir (`.step-000120.partial`) by every process (accelerate's
`save_state`: model, optimizer, RNG states of each rank) plus `trainer_state.json` (the data
position) and `scheduler.json` (the LR schedule). The main process then writes `COMPLETE.json` —
every file with its size — last, and renames the dir into place. A dir without the marker, or
whose files do not match it, is incomplete or corrupt: `--resume auto` warns and takes the
previous one. Object stores mounted as folders "rename" by copying, which is why the marker lists
the files instead of trusting the rename alone.

A run dir may sit on a shared bucket, so loading a checkpoint must never run code from it.
accelerate unpickles the state of objects registered with `register_for_checkpointing`
(`custom_checkpoint_*.pkl`) with `weights_only=False`: a crafted pickle there ran its code on
resume (issue #18). So nothing is registered (the scheduler's state is JSON), a checkpoint holding
such a file is refused, and everything else accelerate loads goes through `weights_only=True`.
accelerate also ignores RNG states it cannot read, which would make the "exact" resume silently
inexact: they are read here first, and a checkpoint whose RNG state does not load is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core import console
from ..core.errors import VicunaError
from ..core.store import atomic_write_text

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"
SCHEDULER = "scheduler.json"
METHOD_STATE = "method_state.json"  # a method's own state (PPO: KL controller, score moments), JSON
_NAME = re.compile(r"^step-(\d+)$")
_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # accelerate's name, see the module docstring
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


@dataclass
class TrainerState:
    """Where training is: the next optimizer step to run is `step` of `epoch` (0-based)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    seconds: float = 0.0  # training time so far (for tokens/s across restarts)
    tokens: int = 0
    supervised_tokens: int = 0
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss (loop.py)
    nonfinite_in_a_row: int = 0


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(accelerator: Any, scheduler: Any, run_dir: Path, state: TrainerState, keep: int,
         extra: dict | None = None) -> Path:
    """Write checkpoint `step-N` atomically (collective: every process calls it); `extra`, a
    method's JSON state, goes to METHOD_STATE."""
    root = checkpoints_dir(run_dir)
    final = root / f"step-{state.global_step:06d}"
    tmp = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE, json.dumps(asdict(state), indent=1) + "\n")
        atomic_write_text(tmp / SCHEDULER, json.dumps(scheduler.state_dict(), indent=1) + "\n")
        if extra is not None:
            atomic_write_text(tmp / METHOD_STATE, json.dumps(extra, indent=1) + "\n")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _fsync_tree(tmp)
        atomic_write_text(tmp / MARKER, json.dumps({"step": state.global_step, "files": files}, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(root, keep)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _rotate(root: Path, keep: int) -> None:
    complete = [p for p in _candidates(root) if problem(p) is None]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.partial"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return "incomplete (no completion marker)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "corrupt (unreadable completion marker)"
    for name, size in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"corrupt ({name} is missing)"
        if path.stat().st_size != size:
            return f"corrupt ({name} has {path.stat().st_size} bytes, {size} expected)"
    return None


def newest_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first; the skipped ones are reported with a warning."""
    usable = []
    for checkpoint in reversed(_candidates(checkpoints_dir(run_dir))):
        why = problem(checkpoint)
        if why:
            console.warn(f"skipping checkpoint {checkpoint}: {why}")
        else:
            usable.append(checkpoint)
    return usable


def load(accelerator: Any, scheduler: Any, checkpoint: Path) -> TrainerState:
    """Restore everything `save` wrote; raises VicunaError when the files do not load or the
    checkpoint holds a part that could run code."""
    unsafe = sorted(p.name for p in checkpoint.iterdir() if _CUSTOM.match(p.name))
    if unsafe:
        raise VicunaError(f"checkpoint {checkpoint} holds {', '.join(unsafe)}, a pickle vicuna never writes "
                          "and does not load (unpickling it could run code)",
                          hint="resume from another checkpoint, or delete that file if you wrote it yourself")
    try:
        state = TrainerState(**json.loads((checkpoint / STATE).read_text()))
        schedule = json.loads((checkpoint / SCHEDULER).read_text())
        _check_rng_state(checkpoint / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        scheduler.load_state_dict(schedule)
    except VicunaError:
        raise
    except Exception as exc:  # torch, safetensors and pickle each raise their own types
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        raise VicunaError(f"checkpoint {checkpoint} does not load: {first}") from exc
    return state


def read_extra(checkpoint: Path) -> dict | None:
    """The method state `save` wrote with the checkpoint (None when it has none)."""
    path = checkpoint / METHOD_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _check_rng_state(path: Path) -> None:
    """accelerate skips an unreadable RNG state with an info-level log line; the resumed run would
    then draw other random numbers than the uninterrupted one. Read it the way accelerate will."""
    from accelerate.utils import load as accelerate_load

    try:
        states = accelerate_load(path, weights_only=True)
        missing = [key for key in RNG_KEYS if key not in states]
    except Exception as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
    else:
        if not missing:
            return
        reason = f"no {', '.join(missing)}"
    raise VicunaError(f"the RNG state {path} does not load ({reason}): resuming from it would not be exact")


def resume(accelerator: Any, scheduler: Any, run_dir: Path, how: str) -> tuple[TrainerState, Path | None]:
    """`how` is "auto" (newest complete checkpoint, else a fresh start) or a checkpoint dir."""
    if how != "auto":
        path = Path(how).expanduser()
        why = problem(path) if path.is_dir() else "not a directory"
        if why:
            raise VicunaError(f"cannot resume from {path}: {why}", hint="use --resume auto to take the newest complete one")
        return load(accelerator, scheduler, path), path
    for checkpoint in newest_complete(run_dir):
        try:
            return load(accelerator, scheduler, checkpoint), checkpoint
        except VicunaError as exc:
            console.warn(f"skipping checkpoint {checkpoint}: {exc.message}")
    if accelerator.is_main_process:
        console.info(f"--resume auto: no complete checkpoint in {checkpoints_dir(run_dir)}, starting at step 0")
    return TrainerState(), None
