"""`vicuna chat` end to end with the real embedded model (SmolLM2-135M), as a user runs it.

Each test is one real `python -m vicuna_cli chat` process with stdin not a terminal, so the
scripted mode answers and exits. Answers must be alone on stdout; logs and speed go to stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 180  # seconds per process: import + model load + a few dozen tokens, with room to spare
STATS_LINE = re.compile(r"^first token (\S+) s · [\d.]+ tok/s · (\d+) prompt \+ (\d+) output tokens · (\w+)$")


def chat(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORCE_COLOR"))}
    env.pop("VICUNA_DEBUG", None)
    env["VICUNA_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "vicuna_cli", "chat", *args],
        input=stdin,  # a pipe, not a terminal: the scripted mode
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )


def stats_lines(stderr: str) -> list[re.Match]:
    return [m for m in map(STATS_LINE.match, stderr.splitlines()) if m]


def test_prompt_answers_on_stdout_and_logs_on_stderr(embedded_model_home):
    result = chat(embedded_model_home, "--prompt", "What is the capital of France?",
                  "--temperature", "0", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    # stdout is the answer only: one line, no model log, no speed line.
    assert len(result.stdout.splitlines()) == 1, result.stdout
    for log in ("first token", "tok/s", "smollm2", "context 8192", "error"):
        assert log not in result.stdout
    assert "model smollm2-135m-instruct" in result.stderr
    (stats,) = stats_lines(result.stderr)
    assert int(stats.group(2)) > 0 and 0 < int(stats.group(3)) <= 40
    assert stats.group(4) in ("stop", "length")
    assert "Traceback" not in result.stderr


def test_json_lines_from_stdin(embedded_model_home):
    questions = ["What is the capital of France?", "And of Italy?"]
    result = chat(embedded_model_home, "--json", "--temperature", "0", "--max-new-tokens", "12",
                  stdin="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    records = [json.loads(line) for line in lines]
    for record, question in zip(records, questions):
        assert set(record) == {"model", "prompt", "answer", "stats"}
        assert record["model"] == "smollm2-135m-instruct"
        assert record["prompt"] == question
        assert isinstance(record["answer"], str) and record["answer"].strip()
        stats = record["stats"]
        assert set(stats) == {"prompt_tokens", "output_tokens", "time_to_first_token", "total_time",
                              "finish_reason", "tokens_per_second", "queue_time", "cached_tokens"}
        assert 0 <= stats["queue_time"] <= stats["time_to_first_token"]
        assert 0 <= stats["cached_tokens"] < stats["prompt_tokens"]
        assert 0 < stats["output_tokens"] <= 12
        assert stats["finish_reason"] in ("stop", "length")
    assert "Paris" in records[0]["answer"]
    # One conversation: the second prompt carries the first exchange.
    first, second = (r["stats"] for r in records)
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["output_tokens"]
    assert len(stats_lines(result.stderr)) == 2  # speed per turn on stderr, not in the JSON stream


def test_prompt_longer_than_the_context_is_one_error_line(embedded_model_home):
    result = chat(embedded_model_home, "--prompt", "word " * 9000, "--temperature", "0")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "context" in errors[0] and "8192" in errors[0]
    assert re.search(r"the prompt is (\d+) tokens", errors[0])
    assert int(re.search(r"the prompt is (\d+) tokens", errors[0]).group(1)) > 8192
    assert not stats_lines(result.stderr)  # nothing was generated
