"""Attack: a run dir on a shared bucket is writable by someone else. They drop a crafted pickle into
the newest checkpoint (and update COMPLETE.json with its size, so the checkpoint looks complete).
`vicuna train sft ... --resume auto` used to unpickle accelerate's `custom_checkpoint_0.pkl` with
`weights_only=False`, which ran the pickle's code. Resuming must never run it: the checkpoint is
skipped with a warning (or refused when named explicitly) and the marker file never appears.

Also: accelerate ignores an RNG state it cannot read, so a resume would silently not be exact;
such a checkpoint is skipped as well, saying why (issue #18, item 2).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import losses, resume_config

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.checkpoint import MARKER
from vicuna_cli.train.sft import run_sft


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def plant(checkpoint: Path, name: str, marker: Path) -> None:
    """Write the crafted pickle and record its size in the completion marker, as an attacker can."""
    torch.save(Payload(marker), checkpoint / name)
    listed = json.loads((checkpoint / MARKER).read_text())
    listed["files"][name] = (checkpoint / name).stat().st_size
    (checkpoint / MARKER).write_text(json.dumps(listed))


def copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to / "checkpoints"


def test_a_planted_custom_state_pickle_is_never_unpickled(resume_reference, tmp_path, capsys):
    model_dir, data, ref = resume_reference
    checkpoints = copy_run(ref, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(checkpoints / "step-000010", "custom_checkpoint_0.pkl", marker)
    result = run_sft(resume_config(model_dir, data, tmp_path / "run", resume="auto"))
    assert not marker.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping checkpoint" in err and "holds custom_checkpoint_0.pkl, a pickle vicuna never writes" in err
    assert result.resumed_from == checkpoints / "step-000008"
    assert losses(tmp_path / "run") == losses(ref)  # the older checkpoint still resumes exactly

    plant(checkpoints / "step-000010", "custom_checkpoint_0.pkl", marker)  # the resumed run rewrote step 10
    with pytest.raises(VicunaError, match="custom_checkpoint_0.pkl"):  # named explicitly: refused
        run_sft(resume_config(model_dir, data, tmp_path / "run", resume=str(checkpoints / "step-000010")))
    assert not marker.exists()


@pytest.mark.parametrize("part", ["optimizer.bin", "random_states_0.pkl"])
def test_a_crafted_pickle_in_place_of_any_state_is_refused(resume_reference, tmp_path, capsys, part):
    model_dir, data, ref = resume_reference
    checkpoints = copy_run(ref, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(checkpoints / "step-000010", part, marker)
    result = run_sft(resume_config(model_dir, data, tmp_path / "run", resume="auto"))
    assert not marker.exists()
    assert result.resumed_from == checkpoints / "step-000008"
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping checkpoint" in err and "step-000010" in err
    if part.startswith("random_states"):
        # accelerate would have skipped it with an info-level log line and resumed inexactly
        assert "resuming from it would not be exact" in err
    assert losses(tmp_path / "run") == losses(ref)
