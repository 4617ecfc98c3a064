"""The shared loop skips a step whose loss is NaN or infinite (no weight changes, counted in the
trainer state and metrics.jsonl), and three in a row stop the run with a message naming the steps
and a checkpoint that --resume auto continues from. Any method: here SFT with a loss that turns
non-finite on chosen steps."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from train_helpers import sft_config, write_data

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.checkpoint import MARKER, STATE
from vicuna_cli.train.rundir import read_metrics
from vicuna_cli.train.sft import _sft_method, run_training


def poisoned(bad_steps: set[int]):
    """The SFT method whose loss is NaN/inf on `bad_steps` (1-based: one packed micro-batch per step)."""
    method = _sft_method()
    calls = []

    def loss(cfg):
        inner = method.loss(cfg)

        def fn(model, batch):
            calls.append(1)
            value = inner(model, batch)
            step = len(calls)
            return value * (math.inf if step % 2 else math.nan) if step in bad_steps else value

        return fn

    return dataclasses.replace(method, loss=loss), calls


def run_config(sp_model_dir, tmp_path, **extra):
    data = write_data(tmp_path / "data.json", n=32, seed=2)
    # one packed row holds a whole step, so the loss is called once per step
    return sft_config(sp_model_dir, data, tmp_path / "run", max_steps=8, micro_batch_tokens=4096, learning_rate=1e-3, **extra)


def test_nonfinite_steps_are_skipped_and_counted(sp_model_dir, tmp_path):
    method, calls = poisoned({3, 4})
    result = run_training(run_config(sp_model_dir, tmp_path, save_every=8), method)
    assert len(calls) == 8 and result.steps == 8
    metrics = [m for m in read_metrics(tmp_path / "run") if "eval_loss" not in m]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert [m.get("skipped") for m in metrics if "skipped" in m] == ["non-finite loss (inf)", "non-finite loss (nan)"]
    assert [m["step"] for m in metrics if "loss" not in m] == [3, 4]
    # no NaN reached the weights: every later step has a finite loss
    assert all(math.isfinite(m["loss"]) for m in metrics if m["step"] > 4)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000008" / STATE).read_text())
    assert state["nonfinite_steps"] == 2 and state["nonfinite_in_a_row"] == 0


def test_three_in_a_row_stop_with_a_checkpoint_that_resumes(sp_model_dir, tmp_path):
    method, _ = poisoned({2, 3, 4})
    with pytest.raises(VicunaError, match=r"NaN or infinite at steps 2 to 4 \(3 in a row\): stopped after step 4; "
                                          r"checkpoint saved to .*step-000004 \(weights of step 1\)") as error:
        run_training(run_config(sp_model_dir, tmp_path), method)
    assert "--resume auto" in error.value.hint
    saved = tmp_path / "run" / "checkpoints" / "step-000004"
    assert (saved / MARKER).is_file() and not (tmp_path / "run" / "model.safetensors").exists()
    assert json.loads((saved / STATE).read_text())["nonfinite_steps"] == 3
    clean, _ = poisoned(set())
    result = run_training(run_config(sp_model_dir, tmp_path, resume="auto"), clean)
    assert result.resumed_from == saved and result.steps == 8
    steps = [m for m in read_metrics(tmp_path / "run") if "eval_loss" not in m]
    assert [m["step"] for m in steps] == list(range(1, 9)) and all(math.isfinite(m["loss"]) for m in steps[4:])
