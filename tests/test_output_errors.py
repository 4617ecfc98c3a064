"""User errors reported as user errors, early (issue #18, item 13): an output that cannot be
written fails with one line and exit 1 before anything slow is loaded (it was exit 2, "please
report it", and `train sft` only failed after 10-13 s of loading), and a judge cache with corrupt
pages says to delete it.

The tests run as root, for whom a chmod'ed read-only dir is writable. Two stand-ins fail for root
too: an output path under a regular FILE (real, end to end), and a read-only dir simulated in
process by making os.open refuse to create files in it (EACCES, as the kernel would).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import corpus


from vicuna_cli.core.errors import VicunaError
from vicuna_cli.data.pipeline import CleanConfig, clean
from vicuna_cli.judge.client import Cache, Reply
from vicuna_cli.train import modeling
from vicuna_cli.train.config import TrainConfig
from vicuna_cli.train.sft import run_sft


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """A dir in which no file can be created: os.open with O_CREAT fails with EACCES there."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.fsdecode(path)).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    return folder


def test_data_clean_under_a_file_is_a_one_line_user_error(tmp_path):
    source = corpus(tmp_path / "in.json", 10)
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    result = subprocess.run([sys.executable, "-m", "vicuna_cli", "data", "clean", str(source), "-o",
                             str(blocker / "sub" / "out.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"cannot write the output in {blocker / 'sub'}: {blocker} is a file, not a directory" in " ".join(result.stderr.split())
    assert "please report" not in result.stderr and "Traceback" not in result.stderr


def test_data_clean_into_a_read_only_dir_fails_before_reading(tmp_path, read_only):
    source = corpus(tmp_path / "in.json", 10)
    with pytest.raises(VicunaError, match=f"cannot write the output in {read_only}: Permission denied"):
        clean(CleanConfig(inputs=[str(source)], output=read_only / "out.jsonl", workers=1))


def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_train_sft_checks_its_output_before_loading_the_model(tmp_path, monkeypatch, read_only, where):
    monkeypatch.setattr(modeling, "load_for_training", _never_load)
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out, why = tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file, not a directory"
    else:
        out, why = read_only, "Permission denied"
    (tmp_path / "data.json").write_text("[]")  # inputs are checked first (next test)
    config = TrainConfig(model="unused", data=[str(tmp_path / "data.json")], output=out)
    with pytest.raises(VicunaError, match=f"cannot write the run in {out}: {why}"):
        run_sft(config)


@pytest.mark.parametrize("command", [["train", "sft"], ["train", "rm"], ["train", "dpo"]])
@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_a_missing_input_fails_before_the_run_dir_is_made(tmp_path, monkeypatch, command, option):
    """A mistyped data path used to surface only after the model loaded, leaving an empty run dir."""
    from typer.testing import CliRunner

    from vicuna_cli.cli import app

    monkeypatch.setattr(modeling, "load_for_training", _never_load)
    (tmp_path / "pairs.jsonl").write_text("")
    data = [str(tmp_path / "pairs.jsonl")] if option == "--eval-data" else []
    args = [*command, "-m", "unused", *(["--data", *data] if data else []), option, str(tmp_path / "typo.jsonl"),
            "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)  # the app raises; `vicuna`'s handler prints it as one line
    assert isinstance(result.exception, VicunaError)
    assert result.exception.message == f"input {tmp_path / 'typo.jsonl'} does not exist"
    assert not (tmp_path / "run").exists()


def test_a_judge_cache_with_corrupt_pages_says_delete_it(tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    cache = Cache(path)
    for i in range(300):
        cache.put(f"key-{i}", "judge", Reply("x" * 200, 1, 1))
    cache.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:len(data) - page] = b"\xa5" * (len(data) - 3 * page)  # header intact, pages garbage
    path.write_bytes(bytes(data))
    with pytest.raises(VicunaError) as caught:
        reopened = Cache(path)
        reopened.get("key-150")
    assert f"the judge cache {path} is not usable" in caught.value.message
    assert caught.value.hint.startswith(f"delete it ({path})")
    with pytest.raises(sqlite3.DatabaseError):  # the file really is corrupt, not just refused
        sqlite3.connect(str(path)).execute("SELECT COUNT(*) FROM replies WHERE text != ''").fetchall()
