"""Preemption: runs killed by SIGKILL or stopped by SIGTERM, then resumed with --resume auto, give
the same per-step losses as an uninterrupted run (CPU, deterministic); bad checkpoints are skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vicuna_cli.train.checkpoint import MARKER
from vicuna_cli.train.config import TrainConfig
from vicuna_cli.train.rundir import read_metrics
from vicuna_cli.train.sft import run_sft

from test_train_sft import write_data

STEPS = 10
ARGS = ["--max-length", "256", "--global-batch-size", "4", "--max-steps", str(STEPS), "--learning-rate", "5e-3",
        "--save-every", "2", "--keep-checkpoints", "3", "--log-every", "1", "--lora", "--lora-r", "4",
        "--threads", "1"]  # fixed: the adaptive count may change the order of float sums mid-run


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def config(model_dir: Path, data: Path, out: Path, **extra) -> TrainConfig:
    # LoRA dropout (0.05) draws random numbers every step: resuming must restore the RNG states.
    return TrainConfig(model=str(model_dir), data=[str(data)], output=out, max_length=256, global_batch_size=4,
                       max_steps=STEPS, learning_rate=5e-3, save_every=2, keep_checkpoints=3, log_every=1,
                       lora=True, lora_r=4, **extra)


@pytest.fixture(scope="module")
def setup(sp_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data.json", n=40, seed=1)
    reference = root / "reference"
    run_sft(config(sp_model_dir, data, reference))
    assert len(losses(reference)) == STEPS
    return sp_model_dir, data, reference


def start(model_dir: Path, data: Path, out: Path, method: str = "sft", args: list[str] = ARGS) -> subprocess.Popen:
    command = [sys.executable, "-m", "vicuna_cli", "train", method, "-m", str(model_dir), "--data", str(data),
               "-o", str(out), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(process: subprocess.Popen, out: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(losses(out)) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {steps} within {timeout} s")


def kill_then_resume(process: subprocess.Popen, out: Path, steps: int, resume) -> None:
    """SIGKILL after 5 steps, then `resume()` (the run with --resume auto) continues from a checkpoint."""
    try:
        wait_for_steps(process, out, 5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.communicate(timeout=30)
    assert len(losses(out)) < steps
    result = resume()
    assert result.resumed_from is not None and result.resumed_from.parent == out / "checkpoints"


def terminate_then_resume(process: subprocess.Popen, out: Path, steps: int, resume) -> None:
    """SIGTERM after 3 steps saves a checkpoint of the last finished step; `resume()` starts there."""
    try:
        wait_for_steps(process, out, 3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    stopped = len(losses(out))
    assert 3 <= stopped < steps
    assert f"stopped by SIGTERM after step {stopped}" in stderr
    saved = out / "checkpoints" / f"step-{stopped:06d}"
    assert (saved / MARKER).is_file()
    assert resume().resumed_from == saved


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(setup, tmp_path):
    model_dir, data, reference = setup
    out = tmp_path / "killed"
    kill_then_resume(start(model_dir, data, out), out, STEPS, lambda: run_sft(config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference)


@pytest.mark.slow
def test_sigterm_saves_then_resume_auto_matches_an_uninterrupted_run(setup, tmp_path):
    model_dir, data, reference = setup
    out = tmp_path / "terminated"
    terminate_then_resume(start(model_dir, data, out), out, STEPS,
                          lambda: run_sft(config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference)


def test_resume_auto_skips_corrupt_and_incomplete_checkpoints(setup, tmp_path, capsys):
    import shutil

    model_dir, data, reference = setup
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000006", "step-000008", "step-000010"]
    # step 12: killed while saving (no marker); step 10: a file cut short; step 8: same size, garbage inside
    shutil.copytree(checkpoints / "step-000010", checkpoints / "step-000012")
    (checkpoints / "step-000012" / MARKER).unlink()
    state = checkpoints / "step-000010" / "optimizer.bin"
    state.write_bytes(state.read_bytes()[:100])
    weights = checkpoints / "step-000008" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    result = run_sft(config(model_dir, data, out, resume="auto"))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-000012: incomplete (no completion marker)" in err
    assert "step-000010: corrupt (optimizer.bin has 100 bytes" in err
    assert "step-000008 does not load" in err
    assert result.resumed_from == checkpoints / "step-000006"
    assert losses(out) == losses(reference)


def test_resume_refuses_changed_data_options(setup, tmp_path):
    import shutil

    from vicuna_cli.core.errors import VicunaError

    model_dir, data, reference = setup
    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    with pytest.raises(VicunaError, match=r"--resume: the run in .* used other data options: --global-batch-size \(was 4, now 8\)"):
        run_sft(config(model_dir, data, out, resume="auto").model_copy(update={"global_batch_size": 8}))
