"""The `vicuna` command as a user runs it: help, version, exit codes, stdout/stderr discipline."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time

import pytest

from vicuna_cli.core.templates import EXAMPLE_CONVERSATION, get_template


def vicuna(*args: str, input: str | None = "", env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vicuna_cli", *args],
        input=input, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_and_version_do_not_import_torch():
    code = "import sys, vicuna_cli.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_help_lists_every_command():
    # Speed is measured in BENCHMARKS.md (bench_cold_start.py), not by a timed test; that --help
    # stays instant is guarded by the test that torch is not imported at start-up.
    # The listed names are read from the Commands panel's first column and compared with the app's
    # registered commands, so a command missing from the help (or a stale entry) fails.
    import typer.main

    from vicuna_cli.cli import app

    result = vicuna("--help", env={"COLUMNS": "120"})
    assert result.returncode == 0
    panel = result.stdout.split("Commands")[1]
    listed = {m.group(1) for m in re.finditer(r"^│ ([a-z][a-z-]*) ", panel, re.MULTILINE)}
    registered = {name for name, cmd in typer.main.get_command(app).commands.items() if not cmd.hidden}
    assert listed == registered
    assert {"chat", "templates", "models", "data", "train", "apply-delta", "serve", "judge"} <= registered


def test_version():
    result = vicuna("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("vicuna ")


def test_templates_list_and_show():
    listed = vicuna("templates", "--json")
    names = [row["name"] for row in json.loads(listed.stdout)]
    assert names == ["vicuna_v1.1", "vicuna_v0", "stable-vicuna", "alpaca", "llama-2", "auto"]
    shown = vicuna("templates", "show", "vicuna_v1.1")
    assert shown.stdout == get_template("vicuna_v1.1").render(EXAMPLE_CONVERSATION).text + "\n"


def test_unknown_template_is_one_red_line_and_exit_1():
    result = vicuna("templates", "show", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: unknown template 'nope'; known: ")
    assert "vicuna_v1.1" in lines[0]
    assert lines[1].startswith("hint:")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = vicuna("--debug", "templates", "show", "nope")
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_unknown_model(sp_model_dir):
    result = vicuna("chat", "-m", "no-such-alias", "-p", "hi")
    assert result.returncode == 1
    assert "unknown model 'no-such-alias'" in result.stderr and "smollm2-135m-instruct" in result.stderr


def test_broken_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = vicuna("chat", "-m", str(tmp_path), "-p", "hi")
    assert result.returncode == 1
    assert "has no weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_scripted_answers_only_on_stdout(sp_model_dir):
    result = vicuna("chat", "-m", str(sp_model_dir), "--temperature", "0", "--max-new-tokens", "6", input="Hello there\n\nhow are you?\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2  # one answer per non-empty line
    assert "tok/s" not in result.stdout and "model " not in result.stdout
    assert result.stderr.count("tok/s") == 2


def test_chat_json_mode(sp_model_dir, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text("max-new-tokens: 5\ntemperature: 0\n")
    result = vicuna("chat", "-m", str(sp_model_dir), "--config", str(config), "--json", "-p", "Hello there", "-p", "Paris?")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello there", "Paris?"]
    assert all(r["stats"]["output_tokens"] <= 5 for r in records)
    assert {"model", "answer", "stats"} <= set(records[0])


def test_chat_bad_flag_value_names_the_flag(sp_model_dir):
    result = vicuna("chat", "-m", str(sp_model_dir), "--temperature", "5", "-p", "hi")
    assert result.returncode == 1
    assert "--temperature" in result.stderr


def test_chat_prompt_longer_than_context(sp_model_dir):
    result = vicuna("chat", "-m", str(sp_model_dir), "-p", "Paris " * 400)
    assert result.returncode == 1
    assert "context" in result.stderr and "Traceback" not in result.stderr


def test_models_pull_prints_the_local_path(sp_model_dir):
    result = vicuna("models", "pull", str(sp_model_dir))
    assert result.returncode == 0
    assert result.stdout.strip() == str(sp_model_dir)


def test_ctrl_c_inside_a_command_says_interrupted(tmp_path):
    """typer turns Ctrl-C inside a command into a silent exit 130; the user must see why it stopped."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    # A server that accepts the connection and never answers: `data fetch` blocks in its read.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    vicuna = Path(sys.executable).parent / "vicuna"
    proc = subprocess.Popen([str(vicuna), "data", "fetch", f"http://127.0.0.1:{port}/x.json", "-o", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.settimeout(30)
        conn, _ = server.accept()  # the command is now inside its body, waiting for a response
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("x.json"))  # no half-written output
