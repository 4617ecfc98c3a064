"""`vicuna chat --api-base`: the OpenAI backend against a tiny stdlib OpenAI-compatible server.

The shared fake server (`fake_openai.FakeOpenAI`) runs in a thread on 127.0.0.1, answers `"echo: " + last user message`
as an SSE stream, records every request, and can enforce an API key or fail on purpose.

The CLI runs through `cli.main` in this process (fixture `vicuna`, ~50 ms a run) and, where the
real entry point matters (exit codes, the environment, a failing server that must not hang
the process), as a real subprocess with a timeout (`vicuna_process`, ~1 s a run); one test calls
`runner.run` directly.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import processes
import pytest
from fake_openai import MODEL_ID

CLI_TIMEOUT = 60  # seconds; a CLI run here takes ~1 s, so a hang fails instead of blocking CI


@pytest.fixture
def server(fake_openai):
    """The shared fake OpenAI server (conftest.py, fake_openai.py): echoes the last user message."""
    return fake_openai


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that is bound but not listening: connecting to it is refused."""
    with processes.closed_port() as port:
        yield port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.pop("VICUNA_DEBUG", None)
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def vicuna_process(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Result:
    """`vicuna chat ARGS` as a real process: the entry point, exit code and output a user sees."""
    done = subprocess.run(
        [sys.executable, "-m", "vicuna_cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        timeout=CLI_TIMEOUT,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def vicuna(monkeypatch, capsys):
    """`vicuna chat ARGS` through the same `cli.main` in this process (~20x faster than a
    process; the error handling and exit codes are the same code)."""
    from vicuna_cli import cli

    for name in [k for k in os.environ if k.startswith("OPENAI_")] + ["VICUNA_DEBUG"]:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Result:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", ["vicuna", "chat", *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: scripted mode
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return Result(code if isinstance(code, int) else (0 if code is None else 1), out, err)

    return run


def _assert_one_error_line(result: Result, *fragments: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


# ---------------------------------------------------------------------------------------------


def test_prompt_prints_the_server_answer(server):
    result = vicuna_process("--api-base", server.base, "--prompt", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hi\n"
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout
    # The model id came from GET /v1/models; the request streams and asks for usage.
    (body,) = server.completions()
    assert body["model"] == MODEL_ID
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    # Usage from the server's last chunk is what the stats report: 1 prompt word, 2 pieces.
    assert "1 prompt + 2 output tokens" in result.stderr
    assert "stop" in result.stderr


def test_multi_turn_history_is_sent(server, vicuna):
    result = vicuna("--api-base", server.base, "-m", "my-model", "--system", "Be brief.",
                    "--prompt", "first question", "--prompt", "second question")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: first question\necho: second question\n"
    first, second = server.completions()
    assert first["model"] == second["model"] == "my-model"  # -m skips GET /v1/models
    assert all(r["path"] != "/v1/models" for r in server.log)
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
    ]
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "echo: first question"},
        {"role": "user", "content": "second question"},
    ]


def test_stdin_lines_with_json_output(server, vicuna):
    result = vicuna("--api-base", server.base, "--json", stdin="one\n\ntwo\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["model"], r["prompt"], r["answer"]) for r in records] == [
        (MODEL_ID, "one", "echo: one"),
        (MODEL_ID, "two", "echo: two"),
    ]
    assert records[1]["stats"]["finish_reason"] == "stop"
    assert records[1]["stats"]["output_tokens"] == 3  # "echo: two" in pieces of 4 characters
    assert len(server.completions()) == 2  # the blank line asked nothing


def test_sampling_options_reach_the_server(server, vicuna):
    result = vicuna("--api-base", server.base, "--prompt", "hi", "--temperature", "0.3",
                    "--top-p", "0.9", "--max-new-tokens", "17", "--seed", "1234")
    assert result.returncode == 0, result.stderr
    (body,) = server.completions()
    assert body["temperature"] == pytest.approx(0.3)
    assert body["top_p"] == pytest.approx(0.9)
    assert body["max_tokens"] == 17
    assert body["seed"] == 1234


def test_seed_is_not_sent_unless_given(server, vicuna):
    result = vicuna("--api-base", server.base, "--prompt", "hi")
    assert result.returncode == 0, result.stderr
    (body,) = server.completions()
    assert "seed" not in body
    assert body["temperature"] == pytest.approx(0.7) and body["top_p"] == 1.0 and body["max_tokens"] == 512


def test_api_key_flag_is_sent(server, vicuna):
    server.api_key = "sk-right"
    result = vicuna("--api-base", server.base, "--api-key", "sk-right", "--prompt", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hi\n"
    assert set(server.auth_headers()) == {"Bearer sk-right"}


def test_wrong_api_key_is_one_error_line(server):
    server.api_key = "sk-right"
    result = vicuna_process("--api-base", server.base, "--api-key", "sk-wrong", "--prompt", "hi")
    _assert_one_error_line(result, "rejected the API key (401)", server.base)
    assert "hint: pass --api-key or set OPENAI_API_KEY" in result.stderr
    assert result.stdout == ""
    assert server.completions() == []  # it failed at GET /v1/models already


def test_wrong_api_key_on_the_completion_request(server, vicuna):
    """With -m the first request is the completion itself; a 401 there is the same one line."""
    server.api_key = "sk-right"
    result = vicuna("--api-base", server.base, "-m", MODEL_ID, "--api-key", "sk-wrong", "--prompt", "hi")
    _assert_one_error_line(result, "rejected the API key (401)")
    assert len(server.completions()) == 1  # a 401 is not retried


def test_openai_api_key_env_is_used(server):
    server.api_key = "sk-from-env"
    result = vicuna_process("--api-base", server.base, "--prompt", "hi", env=_env(OPENAI_API_KEY="sk-from-env"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hi\n"
    assert set(server.auth_headers()) == {"Bearer sk-from-env"}


def test_api_key_flag_beats_the_env(server, vicuna):
    server.api_key = "sk-flag"
    result = vicuna("--api-base", server.base, "--api-key", "sk-flag", "--prompt", "hi",
                    env={"OPENAI_API_KEY": "sk-env"})
    assert result.returncode == 0, result.stderr
    assert set(server.auth_headers()) == {"Bearer sk-flag"}


def test_no_key_against_a_server_that_wants_one(server, vicuna):
    server.api_key = "sk-right"
    result = vicuna("--api-base", server.base, "--prompt", "hi")
    _assert_one_error_line(result, "rejected the API key (401)")


def test_refused_connection(closed_port):
    result = vicuna_process("--api-base", f"http://127.0.0.1:{closed_port}/v1", "--prompt", "hi")
    _assert_one_error_line(result, "could not connect", f"127.0.0.1:{closed_port}")
    assert "hint: is the server running" in result.stderr


def test_a_dropped_connection_is_retried_once_not_backed_off():
    """A server that accepts and hangs up at once: the chat client tries twice (one retry), then
    gives up with one error line - counted on the server side, not timed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted, done = [], threading.Event()

    def hang_up():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        result = vicuna_process("--api-base", f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "--prompt", "hi")
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()
    assert result.returncode == 1
    assert len(accepted) == 2


def test_http_500_before_the_stream(server, vicuna):
    server.fault = "http500"
    result = vicuna("--api-base", server.base, "--prompt", "hi")
    _assert_one_error_line(result, "answered 500", "the fake server broke")
    assert result.stdout.strip() == ""


def test_error_event_mid_stream(server):
    server.fault = "error_event"
    result = vicuna_process("--api-base", server.base, "--prompt", "hi")
    _assert_one_error_line(result, "reported an error", "the model crashed mid-answer")
    assert result.stdout.startswith("echo")  # what arrived before the error was shown


def test_connection_cut_mid_stream(server):
    """The server dies after the first chunk: one error line and exit 1, as for any API error.

    (Not exit 2 with "RemoteProtocolError": a dropped connection is the user's environment,
    not a vicuna bug.)"""
    server.fault = "drop"
    result = vicuna_process("--api-base", server.base, "--prompt", "hi")
    assert "Traceback" not in result.stderr
    _assert_one_error_line(result, server.base)


def test_template_with_api_base_is_rejected(server, vicuna):
    result = vicuna("--api-base", server.base, "--template", "vicuna_v1.1", "--prompt", "hi")
    assert result.returncode == 1, result.stderr
    assert "error: " in result.stderr and "--template" in result.stderr
    assert server.log == []


def test_scripted_run_in_process(server, capsys):
    from vicuna_cli.chat.runner import ChatConfig, run

    run(ChatConfig(api_base=server.base, prompt=["alpha", "beta"], json_output=True, temperature=0.0),
        interactive=False)
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["answer"] for r in records] == ["echo: alpha", "echo: beta"]
    assert err.count("tok/s") == 2
    second = server.completions()[1]
    assert second["temperature"] == 0.0
    assert second["messages"][1] == {"role": "assistant", "content": "echo: alpha"}
