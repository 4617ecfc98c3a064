"""`train dpo` on the shared run machinery: SIGKILL or SIGTERM then --resume auto gives the same
per-step losses and rewards as an uninterrupted run (the stored reference log-probs are reused),
and 2 gloo processes equal 1, reference precompute included (pair_runs, on the helpers of the SFT
tests)."""

from __future__ import annotations

import pytest
import torch
from pair_runs import STEPS, interrupt_then_resume, one_and_two_gloo_processes, uninterrupted
from train_helpers import kill_then_resume, losses, terminate_then_resume

from vicuna_cli.train.dpo import DpoConfig, run_dpo
from vicuna_cli.train.rundir import read_metrics


def margins(run_dir) -> list[float]:
    return [m["rewards/margins"] for m in read_metrics(run_dir) if "rewards/margins" in m]


@pytest.fixture(scope="module")
def setup(bpe_model_dir, tmp_path_factory):
    data, reference = uninterrupted(tmp_path_factory.mktemp("dpo_resume"), bpe_model_dir, DpoConfig, run_dpo)
    assert len(losses(reference)) == STEPS and margins(reference)[-1] != 0
    return bpe_model_dir, data, reference


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [kill_then_resume, terminate_then_resume], ids=["sigkill", "sigterm-saves"])
def test_dpo_interrupted_then_resume_auto_matches_an_uninterrupted_run(interrupt, setup, tmp_path):
    """SIGKILL after 5 steps (resumes from the last checkpoint) or SIGTERM after 3 (saves the step it
    finished, resumes there): either way the same per-step log as the uninterrupted run."""
    model_dir, data, reference = setup
    out = tmp_path / "interrupted"
    interrupt_then_resume(interrupt, "dpo", DpoConfig, run_dpo, model_dir, data, out)
    assert losses(out) == losses(reference) and margins(out) == margins(reference)


@pytest.mark.slow
def test_dpo_two_gloo_processes_match_one_process(bpe_model_dir, tmp_path):
    from safetensors import safe_open

    counts = {"loss": 4, "rewards/margins": 4, "rewards/accuracies": 4, "eval_loss": 3, "eval_rewards/margins": 3}
    single, double, _ = one_and_two_gloo_processes("dpo", DpoConfig, run_dpo, bpe_model_dir, tmp_path, counts)
    stored = []
    for run in (single, double):
        with safe_open(str(run / "dpo_reference" / "logps.safetensors"), framework="pt") as f:
            stored.append((f.get_tensor("train"), f.get_tensor("eval")))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(*stored))
