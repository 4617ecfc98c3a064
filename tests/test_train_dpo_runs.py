"""`train dpo` on the shared run machinery: SIGKILL or SIGTERM then --resume auto gives the same
per-step losses and rewards as an uninterrupted run (the stored reference log-probs are reused),
and 2 gloo processes equal 1, reference precompute included (helpers of the SFT tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from vicuna_cli.train.dpo import DpoConfig, run_dpo
from vicuna_cli.train.rundir import read_metrics

from test_train_distributed import flags, free_port
from test_train_resume import kill_then_resume, losses, start, terminate_then_resume
from test_train_rm import write_pairs

STEPS = 8
OPTIONS = {"max_length": 128, "global_batch_size": 4, "max_steps": STEPS, "learning_rate": 5e-3, "save_every": 2,
           "keep_checkpoints": 3, "log_every": 1}


def config(model_dir, data, out, **extra) -> DpoConfig:
    # LoRA dropout draws random numbers every step: resuming must restore the RNG states.
    return DpoConfig(model=str(model_dir), data=[str(data)], output=out, lora=True, lora_r=4, **OPTIONS, **extra)


def margins(run_dir) -> list[float]:
    return [m["rewards/margins"] for m in read_metrics(run_dir) if "rewards/margins" in m]


@pytest.fixture(scope="module")
def setup(bpe_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_resume")
    data = write_pairs(root / "pairs.jsonl", 40, seed=4)
    reference = root / "reference"
    run_dpo(config(bpe_model_dir, data, reference))
    assert len(losses(reference)) == STEPS and margins(reference)[-1] != 0
    return bpe_model_dir, data, reference


ARGS = [*flags(OPTIONS), "--lora", "--lora-r", "4"]


@pytest.mark.slow
def test_dpo_sigkill_then_resume_auto_matches_an_uninterrupted_run(setup, tmp_path):
    model_dir, data, reference = setup
    out = tmp_path / "killed"
    kill_then_resume(start(model_dir, data, out, "dpo", ARGS), out, STEPS,
                     lambda: run_dpo(config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference) and margins(out) == margins(reference)


@pytest.mark.slow
def test_dpo_sigterm_saves_then_resume_auto_matches_an_uninterrupted_run(setup, tmp_path):
    model_dir, data, reference = setup
    out = tmp_path / "terminated"
    terminate_then_resume(start(model_dir, data, out, "dpo", ARGS), out, STEPS,
                          lambda: run_dpo(config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference) and margins(out) == margins(reference)


@pytest.mark.slow
def test_dpo_two_gloo_processes_match_one_process(bpe_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", 30, seed=5)
    options = {**OPTIONS, "global_batch_size": 8, "max_steps": 4, "eval_split": 0.2, "eval_every": 2, "warmup_steps": 0}
    single = tmp_path / "single"
    run_dpo(DpoConfig(model=str(bpe_model_dir), data=[str(data)], output=single, **options))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vicuna_cli", "train", "dpo", "-m", str(bpe_model_dir),
               "--data", str(data), "-o", str(double), "--device", "cpu", *flags(options)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert yaml.safe_load((double / "config.yaml").read_text())["resolved"]["processes"] == 2
    from safetensors import safe_open

    stored = []
    for run in (single, double):
        with safe_open(str(run / "dpo_reference" / "logps.safetensors"), framework="pt") as f:
            stored.append((f.get_tensor("train"), f.get_tensor("eval")))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(*stored))
    one, two = read_metrics(single), read_metrics(double)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/margins"):
        values = [m[key] for m in one if key in m]
        assert len(values) == (4 if key in ("loss", "rewards/margins", "rewards/accuracies") else 3)
        assert [m[key] for m in two if key in m] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
