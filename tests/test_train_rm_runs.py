"""`train rm` on the shared run machinery: SIGKILL or SIGTERM then --resume auto gives the same
per-step losses as an uninterrupted run, and 2 gloo processes equal 1 (pair_runs, on the helpers of
the SFT tests)."""

from __future__ import annotations

import pytest
from pair_runs import interrupt_then_resume, one_and_two_gloo_processes, uninterrupted
from train_helpers import kill_then_resume, losses, terminate_then_resume

from vicuna_cli.train.rm import RewardConfig, run_rm


@pytest.fixture(scope="module")
def setup(bpe_model_dir, tmp_path_factory):
    data, reference = uninterrupted(tmp_path_factory.mktemp("rm_resume"), bpe_model_dir, RewardConfig, run_rm)
    return bpe_model_dir, data, reference


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [kill_then_resume, terminate_then_resume], ids=["sigkill", "sigterm-saves"])
def test_rm_interrupted_then_resume_auto_matches_an_uninterrupted_run(interrupt, setup, tmp_path):
    """SIGKILL after 5 steps (resumes from the last checkpoint) or SIGTERM after 3 (saves the step it
    finished, resumes there): either way the same per-step log as the uninterrupted run."""
    model_dir, data, reference = setup
    out = tmp_path / "interrupted"
    interrupt_then_resume(interrupt, "rm", RewardConfig, run_rm, model_dir, data, out)
    assert losses(out) == losses(reference)


@pytest.mark.slow
def test_rm_two_gloo_processes_match_one_process(bpe_model_dir, tmp_path):
    counts = {"loss": 4, "eval_loss": 3, "eval_accuracy": 3, "eval_margin": 3}
    *_, weights = one_and_two_gloo_processes("rm", RewardConfig, run_rm, bpe_model_dir, tmp_path, counts)
    assert "score.weight" in weights
