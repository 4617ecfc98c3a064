"""`vicuna launch --local`: a recipe's `setup` and `run` on this machine, the way SkyPilot runs
them on one node: in a work dir holding a copy of the recipe's `workdir`, with the recipe's envs
and the `SKYPILOT_*` variables set, under `bash`. Ctrl-C is passed to the whole process group
(a training run saves a checkpoint and stops); what does not stop in time is killed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core import console
from ..core.errors import VicunaError
from .recipe import Recipe


@dataclass
class LocalResult:
    work_dir: Path
    seconds: dict[str, float]  # setup, run


def check_runnable(recipe: Recipe) -> None:
    """Refuse recipes this machine cannot stand in for: GPUs, several nodes."""
    needs = recipe.accelerators()
    if needs and len(needs) == len(list(recipe.task.resources)):
        wanted = " or ".join(", ".join(f"{k}:{v}" for k, v in acc.items()) for acc in needs)
        raise VicunaError(f"--local cannot run {recipe.path.name}: it needs GPUs (resources.accelerators: {wanted})",
                          hint="launch it on a cloud (drop --local), or try `--dry-run` to see what it would run")
    if (recipe.task.num_nodes or 1) > 1:
        raise VicunaError(f"--local cannot run {recipe.path.name}: it needs {recipe.task.num_nodes} nodes (num_nodes)",
                          hint="launch it on a cloud (drop --local)")


def skypilot_env(recipe: Recipe, work_dir: Path) -> dict[str, str]:
    """The variables SkyPilot sets on the one node of a single-node task.

    SKYPILOT_TASK_ID stays the same when the same recipe is launched again with the same envs,
    as a managed job's id stays the same across recoveries: runs keyed on it resume."""
    digest = hashlib.sha256(json.dumps([str(recipe.path.resolve()), sorted(recipe.task.envs.items())]).encode())
    task_id = f"sky-local-{recipe.name}-{digest.hexdigest()[:8]}"
    cluster = {"cluster_name": f"local-{recipe.name}", "cloud": "local", "region": None, "zone": None,
               "num_nodes": 1, "work_dir": str(work_dir)}
    return {
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "0",
        "SKYPILOT_SETUP_NODE_RANK": "0",
        "SKYPILOT_SETUP_NODE_IPS": "127.0.0.1",
        "SKYPILOT_TASK_ID": task_id,
        "SKYPILOT_CLUSTER_INFO": json.dumps(cluster),
    }


def prepare_work_dir(recipe: Recipe, work_dir: Path | None) -> Path:
    """A fresh dir (or the given one) holding the recipe's workdir as SkyPilot would sync it:
    the files git tracks or would track (.gitignore'd ones, like .venv, stay behind)."""
    target = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"vicuna-launch-{recipe.name}-"))
    target.mkdir(parents=True, exist_ok=True)
    source = recipe.task.workdir
    if not source:
        return target
    source = Path(os.path.expanduser(source))
    if not source.is_dir():
        raise VicunaError(f"{recipe.path.name}: workdir {source} is not a directory (it is relative to where you run vicuna launch)")
    for rel in _synced_files(source):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest)
    return target


def _synced_files(source: Path) -> list[str]:
    try:
        listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True, timeout=60).stdout
        return [p for p in listed.decode().split("\0") if p and (source / p).is_file()]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: everything but caches
        return [str(p.relative_to(source)) for p in source.rglob("*")
                if p.is_file() and not {".git", ".venv", "__pycache__"} & set(p.relative_to(source).parts)]


def run_local(recipe: Recipe, work_dir: Path | None = None, stop_timeout: float = 120.0) -> LocalResult:
    check_runnable(recipe)
    for dest in list(recipe.task.file_mounts or {}) + list(recipe.task.storage_mounts or {}):
        console.warn(f"--local: {dest} is not mounted (file_mounts need a cloud node)")
    keep = work_dir is not None
    work = prepare_work_dir(recipe, work_dir)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in recipe.task.envs.items()})
    env.update(skypilot_env(recipe, work))
    # The `vicuna` (and python) of this installation come first, as a node's setup would make them.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    console.info(f"--local: {recipe.path.name} in {work}")
    seconds = {}
    for phase in ("setup", "run"):
        script = getattr(recipe.task, phase)
        if not script:
            continue
        started = time.monotonic()
        code = _run_script(script, work, env, stop_timeout)
        seconds[phase] = time.monotonic() - started
        if code != 0:
            raise VicunaError(f"--local: the recipe's {phase} failed with exit code {code}",
                              hint=f"its work dir is kept: {work}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return LocalResult(work, seconds)


def _run_script(script: str, cwd: Path, env: dict[str, str], stop_timeout: float) -> int:
    # Its own process group, so a Ctrl-C reaches every process the script started (a background
    # `vicuna serve`, its workers) and nothing outlives the launch.
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        console.warn(f"interrupted: stopping the recipe (up to {stop_timeout:.0f} s to save and exit)")
        stop_group(proc, stop_timeout)
        raise VicunaError("--local: interrupted; the recipe's processes were stopped",
                          hint="launch it again: a training run resumes from its last checkpoint", exit_code=130) from None
    if _group_alive(proc.pid):  # something the script left running in the background
        stop_group(proc, 10.0, first=signal.SIGTERM)
    return code


def stop_group(proc: subprocess.Popen, timeout: float, first: signal.Signals = signal.SIGINT) -> None:
    """SIGINT to the group (a training run saves), then SIGTERM, then SIGKILL for what is left."""
    steps = [(signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)]
    for sig, wait in steps[[s for s, _ in steps].index(first):]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
