"""Files vicuna writes atomically get the mode a plain open() would give them (0666 less the
umask), not mkstemp's 0600 (issue #18, item 14): outputs, answer and judgment files were readable
by their owner only. Checked under two umasks, for the one atomic writer (core/store.py) and for
the commands that go through it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from data_helpers import corpus


from vicuna_cli.core.store import atomic_dir, atomic_write_text
from vicuna_cli.data.pipeline import CleanConfig, clean
from vicuna_cli.judge.judging import JudgmentWriter


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_dirs_get_the_umask_mode(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inside").write_text("x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a plain open() gives, for comparison
    assert mode(tmp_path / "a.txt") == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "d") == 0o777 & ~umask


def test_cleaned_data_and_judgments_get_the_umask_mode(tmp_path, umask):
    out = tmp_path / "clean.jsonl"
    clean(CleanConfig(inputs=[str(corpus(tmp_path / "in.json", 10))], output=out, workers=1,
                      report=tmp_path / "report.json"))
    writer = JudgmentWriter(tmp_path / "judgments" / "judge_single.jsonl")
    writer.write({"question_id": 1, "model": "m", "judge": ["judge", "single"], "turn": 1, "score": 5})
    writer.close()
    for path in (out, tmp_path / "report.json", writer.path):
        assert mode(path) == 0o666 & ~umask, path
