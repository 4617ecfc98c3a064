"""Shared by the `vicuna train` tests: a tiny ShareGPT data file, the configs of a short SFT run and
of the resumable LoRA run, CLI flags from options, and the preempt-then-resume checks (SIGKILL,
SIGTERM) that the SFT, RM, DPO and PPO run tests apply to their own commands."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from vicuna_cli.train.checkpoint import MARKER
from vicuna_cli.train.config import TrainConfig
from vicuna_cli.train.rundir import read_metrics


WORDS = "hello there how are you I am fine thank you the capital of France is Paris".split()


def write_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))

    records = [{"id": f"c{i}", "system": "Be brief.", "conversations": [
        t for _ in range(rng.randint(1, 3)) for t in ({"from": "human", "value": text(6)}, {"from": "gpt", "value": text(10)})]}
        for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def sft_config(model_dir, data, out, **overrides) -> TrainConfig:
    # fp32: the SFT tests compare losses exactly; `auto` picks bf16 on a CPU with native bf16
    values = dict(model=str(model_dir), data=[str(data)], output=out, max_length=256, global_batch_size=4,
                  max_steps=4, learning_rate=1e-2, warmup_steps=0, lr_schedule="constant", log_every=2,
                  precision="float32")
    values.update(overrides)
    return TrainConfig(**values)


STEPS = 10


ARGS = ["--max-length", "256", "--global-batch-size", "4", "--max-steps", str(STEPS), "--learning-rate", "5e-3",
        "--save-every", "2", "--keep-checkpoints", "3", "--log-every", "1", "--lora", "--lora-r", "4",
        "--threads", "1"]  # fixed: the adaptive count may change the order of float sums mid-run


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def resume_config(model_dir: Path, data: Path, out: Path, **extra) -> TrainConfig:
    # LoRA dropout (0.05) draws random numbers every step: resuming must restore the RNG states.
    return TrainConfig(model=str(model_dir), data=[str(data)], output=out, max_length=256, global_batch_size=4,
                       max_steps=STEPS, learning_rate=5e-3, save_every=2, keep_checkpoints=3, log_every=1,
                       lora=True, lora_r=4, **extra)


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


def flags(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in ("--" + key.replace("_", "-"), str(value))]
