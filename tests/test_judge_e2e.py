"""End to end: `vicuna serve` with the embedded model is both an answerer and the judge.

The 135M model seldom writes a readable verdict; the test checks that the pipeline completes,
that unreadable verdicts are retried and then counted (never dropped), that a repeated run makes
no judge call, and that `show` prints the tables and writes the PNG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from serve_single import single_server

MODEL = "smollm2-135m-instruct"
SERVER_START_TIMEOUT = 300  # converting nothing (the home is shared), but loading on a busy CI box


@pytest.fixture
def served(embedded_model_home, tmp_path):
    env = {**os.environ, "VICUNA_HOME": str(embedded_model_home)}
    env = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "VICUNA_JUDGE"))}
    with single_server(tmp_path, MODEL, env=env, worker_args=("--dtype", "float32"), timeout=SERVER_START_TIMEOUT) as proc:
        yield f"{proc.url}/v1", env


def _vicuna(env, *args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "vicuna_cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_serve_answers_and_judges_itself(served, tmp_path):
    base, env = served
    questions = [
        {"question_id": 1, "category": "writing", "turns": ["Write one sentence about rain."]},
        {"question_id": 2, "category": "math", "turns": ["What is 3 + 4?"], "reference": ["3 + 4 = 7."]},
    ]
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers, out = tmp_path / "model_answer", tmp_path / "model_judgment"
    common = ["--bench", str(bench)]
    # answers: one set through the server, one from the model loaded in this process
    done = _vicuna(env, "judge", "answer", "-m", MODEL, "--api-base", base, *common, "-o", str(answers),
                   "--max-new-tokens", "16", "--model-id", "smol-served")
    assert done.returncode == 0, done.stderr
    done = _vicuna(env, "judge", "answer", "-m", MODEL, *common, "-o", str(answers), "--max-new-tokens", "16",
                   "--model-id", "smol-local", "--temperature", "1.0", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    for name in ("smol-served", "smol-local"):
        rows = [json.loads(line) for line in (answers / f"{name}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [1, 2] and all(r["choices"][0]["turns"][0] for r in rows)
    judge = ["--answers", str(answers), "-o", str(out), *common, "--judge-model", MODEL,
             "--judge-api-base", base, "--max-tokens", "24", "-j", "4", "--timeout", "900"]
    done = _vicuna(env, "judge", "--pair", "smol-served", "smol-local", *judge)
    m = re.search(r"(\d+) judgments written to .* (\d+) judge calls.*?(\d+) from cache, .*?(\d+) unreadable verdicts", done.stderr, re.S)
    assert m, done.stderr
    records, calls, _, errors = map(int, m.groups())
    rows = [json.loads(line) for line in (out / f"{MODEL}_pair.jsonl").read_text().splitlines()]
    assert records == len(rows) == 2
    failed = errors == records  # a run without one readable verdict exits 1, after its tables
    assert done.returncode == (1 if failed else 0), done.stderr
    assert ("error: all 2 judgments have no readable verdict" in done.stderr) == failed
    assert errors == sum(1 for r in rows if "error" in r)  # counted honestly
    unreadable_games = sum(r["g1_winner"] == "error" for r in rows) + sum(r["g2_winner"] == "error" for r in rows)
    assert calls == 4 + unreadable_games  # each unreadable game got one repair call
    assert f"unreadable verdicts: {errors} of 2 records" in done.stdout
    # a repeated run is served from the cache
    again = _vicuna(env, "judge", "--pair", "smol-served", "smol-local", *judge)
    assert again.returncode == (1 if failed else 0) and " 0 judge calls" in again.stderr, again.stderr
    # a bounded explanation (the schema's maxLength, enforced by the server's grammar) makes the same
    # judge close its explanation and write the verdict: at temperature 0 every verdict is readable
    bounded = tmp_path / "bounded_judgment"
    done = _vicuna(env, "judge", "--pair", "smol-served", "smol-local", "--answers", str(answers), "-o", str(bounded), *common,
                   "--judge-model", MODEL, "--judge-api-base", base, "-j", "4", "--timeout", "900",
                   "--max-tokens", "200", "--temperature", "0", "--explanation-chars", "60")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (bounded / f"{MODEL}_pair.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and not any("error" in r for r in rows)
    for r in rows:
        for text in (r["g1_judgment"], r["g2_judgment"]):
            assert len(json.loads(text)["explanation"]) <= 60
    png = tmp_path / "judge.png"
    done = _vicuna(env, "judge", "show", str(out), "--plot", str(png), "--bootstrap", "20", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Pairwise (win/loss for model_1" in done.stdout and "Bradley-Terry" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
