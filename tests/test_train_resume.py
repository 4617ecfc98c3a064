"""Preemption: runs killed by SIGKILL or stopped by SIGTERM, then resumed with --resume auto, give
the same per-step losses as an uninterrupted run (CPU, deterministic); bad checkpoints are skipped."""

from __future__ import annotations

import pytest
from train_helpers import STEPS, kill_then_resume, losses, resume_config, start, terminate_then_resume

from vicuna_cli.train.checkpoint import MARKER
from vicuna_cli.train.sft import run_sft


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(resume_reference, tmp_path):
    model_dir, data, reference = resume_reference
    out = tmp_path / "killed"
    kill_then_resume(start(model_dir, data, out), out, STEPS, lambda: run_sft(resume_config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference)


@pytest.mark.slow
def test_sigterm_saves_then_resume_auto_matches_an_uninterrupted_run(resume_reference, tmp_path):
    model_dir, data, reference = resume_reference
    out = tmp_path / "terminated"
    terminate_then_resume(start(model_dir, data, out), out, STEPS,
                          lambda: run_sft(resume_config(model_dir, data, out, resume="auto")))
    assert losses(out) == losses(reference)


def test_resume_auto_skips_corrupt_and_incomplete_checkpoints(resume_reference, tmp_path, capsys):
    import shutil

    model_dir, data, reference = resume_reference
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
    result = run_sft(resume_config(model_dir, data, out, resume="auto"))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-000012: incomplete (no completion marker)" in err
    assert "step-000010: corrupt (optimizer.bin has 100 bytes" in err
    assert "step-000008 does not load" in err
    assert result.resumed_from == checkpoints / "step-000006"
    assert losses(out) == losses(reference)


def test_resume_refuses_changed_data_options(resume_reference, tmp_path):
    import shutil

    from vicuna_cli.core.errors import VicunaError

    model_dir, data, reference = resume_reference
    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    with pytest.raises(VicunaError, match=r"--resume: the run in .* used other data options: --global-batch-size \(was 4, now 8\)"):
        run_sft(resume_config(model_dir, data, out, resume="auto").model_copy(update={"global_batch_size": 8}))
