"""What the `train rm` and `train dpo` tests share: synthetic preference pairs, the run config both
build on, and the run-machinery checks (SIGKILL / SIGTERM then --resume auto, 2 gloo processes
against 1) written once for either method."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from processes import free_port
from train_helpers import flags, losses, start

from vicuna_cli.train.rundir import read_metrics


WORDS = "hello there how are you I am fine thank you the capital of France is Paris".split()


def write_pairs(path: Path, n: int, seed: int = 0, sources=("alpha", "beta")) -> Path:
    """The answer that contains "Paris" wins; both answers otherwise random words of similar length."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice([w for w in WORDS if w != "Paris"]) for _ in range(k))

    records = []
    for i in range(n):
        k = rng.randint(2, 6)
        good, bad = words(k).split(), words(k + rng.choice([-1, 0, 1])).split()
        good.insert(rng.randrange(len(good) + 1), "Paris")
        records.append({"id": f"p{i}", "prompt": [{"role": "user", "content": words(rng.randint(2, 5))}],
                        "chosen": [{"role": "assistant", "content": " ".join(good)}],
                        "rejected": [{"role": "assistant", "content": " ".join(bad)}],
                        "source": sources[i % len(sources)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair_config(config_class, model_dir, data, out, **overrides):
    """A small constant-rate run on `data` (pass the method's learning_rate), in fp32: the tests
    compare sums exactly, and `auto` would pick bf16 on a CPU with native bf16 (not on every CI)."""
    values = dict(model=str(model_dir), data=[str(data)], output=out, max_length=128, global_batch_size=8,
                  warmup_steps=0, lr_schedule="constant", log_every=5, precision="float32")
    values.update(overrides)
    return config_class(**values)


def trained_with_held_out(root: Path, model_dir, train_pairs: int, run: Callable, config: Callable, **options):
    """(run dir, held-out pairs file, run's result) of `train_pairs` training pairs evaluated on 60 others."""
    data = write_pairs(root / "train.jsonl", train_pairs, seed=1)
    held = write_pairs(root / "held.jsonl", 60, seed=2)
    out = root / "run"
    return out, held, run(config(model_dir, data, out, eval_data=[str(held)], **options))


# ---------------------------------------------------------------- the run machinery (slow tests)

STEPS = 8
# One fixed torch thread count on both sides: the adaptive default (core/threads.py) may change it
# mid-run, and with it the order of float sums, which these exact comparisons must not see.
OPTIONS = {"max_length": 128, "global_batch_size": 4, "max_steps": STEPS, "learning_rate": 5e-3, "save_every": 2,
           "keep_checkpoints": 3, "log_every": 1, "threads": 1}
ARGS = [*flags(OPTIONS), "--lora", "--lora-r", "4"]


def lora_config(config_class, model_dir, data, out, **extra):
    # LoRA dropout draws random numbers every step: resuming must restore the RNG states.
    return config_class(model=str(model_dir), data=[str(data)], output=out, lora=True, lora_r=4, **OPTIONS, **extra)


def uninterrupted(root: Path, model_dir, config_class, run: Callable) -> tuple[Path, Path]:
    """(pairs file, run dir) of the run the interrupted ones must equal."""
    data = write_pairs(root / "pairs.jsonl", 40, seed=4)
    reference = root / "reference"
    run(lora_config(config_class, model_dir, data, reference))
    assert len(losses(reference)) == STEPS
    return data, reference


def interrupt_then_resume(interrupt: Callable, method: str, config_class, run: Callable, model_dir, data, out: Path) -> None:
    """`interrupt` (test_train_resume's kill_then_resume or terminate_then_resume) a CLI run of
    `vicuna train METHOD`, then finish it in-process with --resume auto."""
    interrupt(start(model_dir, data, out, method, ARGS), out, STEPS,
              lambda: run(lora_config(config_class, model_dir, data, out, resume="auto")))


def one_and_two_gloo_processes(method: str, config_class, run: Callable, model_dir, root: Path,
                               counts: dict[str, int]) -> tuple[Path, Path, dict]:
    """The same run in one process and in 2 gloo processes (torch.distributed.run): equal steps,
    equal figures (each of `counts` logged that many times) and equal weights. Returns the two run
    dirs and the one-process weights."""
    from safetensors.torch import load_file

    data = write_pairs(root / "pairs.jsonl", 30, seed=5)
    options = {**OPTIONS, "global_batch_size": 8, "max_steps": 4, "eval_split": 0.2, "eval_every": 2, "warmup_steps": 0}
    single = root / "single"
    run(config_class(model=str(model_dir), data=[str(data)], output=single, **options))
    double = root / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vicuna_cli", "train", method, "-m", str(model_dir),
               "--data", str(data), "-o", str(double), "--device", "cpu", *flags(options)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert yaml.safe_load((double / "config.yaml").read_text())["resolved"]["processes"] == 2
    one, two = read_metrics(single), read_metrics(double)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for key, count in counts.items():
        values = [m[key] for m in one if key in m]
        assert len(values) == count
        assert [m[key] for m in two if key in m] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    return single, double, a
