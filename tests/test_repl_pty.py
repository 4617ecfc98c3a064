"""The interactive `vicuna chat` REPL, driven through a pseudo-terminal with pexpect.

The real embedded model answers. Every expect has a timeout and the child is always killed in a
`finally`, so a stuck REPL fails the test instead of hanging the run.

What a REPL screen looks like to pexpect: prompt-toolkit draws the prompt "»" and moves the cursor
to draw the space after it, so we wait for "»" alone; answers are redrawn by rich's Live, so text
shows up many times, but always whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest

pytestmark = pytest.mark.slow

PROMPT = "»"
STARTUP_TIMEOUT = 120  # import torch + load the model, on a busy 2-core machine
TIMEOUT = 60  # any single step: an answer of at most 40 tokens, a command, an exit
STATS = re.compile(r"(\d+) prompt \+ (\d+) output tokens · (\w+)")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(screen: str) -> str:
    """Terminal output without its escape sequences (cursor moves like ESC[14D hold digits)."""
    return ESCAPE.sub("", screen)


class Repl:
    """A `vicuna chat` child on a pty, with a transcript kept for failure messages."""

    def __init__(self, home: Path, *args: str, stderr: Path | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        env.update(
            VICUNA_HOME=str(home),
            TERM="xterm",
            # No cursor-position requests: nobody on this pty answers them (prompt-toolkit
            # would wait, then print a warning).
            PROMPT_TOOLKIT_NO_CPR="1",
        )
        env.pop("VICUNA_DEBUG", None)
        self.transcript = io.StringIO()
        argv = [sys.executable, "-m", "vicuna_cli", "chat", *args]
        if stderr is not None:  # stdout stays on the terminal, stderr goes to a file
            argv = ["/bin/sh", "-c", 'exec "$@" 2>"$0"', str(stderr), *argv]
        self.child = pexpect.spawn(
            argv[0],
            argv[1:],
            env=env,
            dimensions=(40, 120),
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
        )
        self.child.logfile_read = self.transcript
        self.expect(PROMPT, timeout=STARTUP_TIMEOUT)

    def expect(self, pattern, timeout: float = TIMEOUT) -> int:
        try:
            return self.child.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            tail = self.transcript.getvalue()[-3000:]
            raise AssertionError(f"expected {pattern!r}, got {type(exc).__name__}; screen tail:\n{tail!r}") from None

    def expect_exact(self, text: str, timeout: float = TIMEOUT) -> None:
        self.expect(re.escape(text), timeout)

    def line(self, text: str) -> None:
        """Type a line and press Enter (keys, not a paste)."""
        self.child.send(text)
        time.sleep(0.2)  # let prompt-toolkit draw (and complete) before Enter arrives
        self.child.send("\r")

    def command(self, text: str, *expected: str, timeout: float = TIMEOUT) -> str:
        """Run a line, wait for each expected text in turn, then for the next prompt.
        Returns what the REPL printed between the last expected text and the prompt."""
        self.line(text)
        for each in expected:
            self.expect_exact(each, timeout)
        self.expect(PROMPT, timeout)
        return self.child.before

    def ask(self, question: str) -> tuple[str, re.Match]:
        """Ask, wait for the whole answer; return what was shown and the parsed stats line."""
        self.line(question)
        self.expect("tok/s")
        shown = self.child.before
        self.expect(PROMPT)
        stats = STATS.search(plain(self.child.before))
        assert stats, self.child.before
        return shown, stats

    def wait_exit(self, timeout: float = TIMEOUT) -> int | None:
        self.expect(pexpect.EOF, timeout)
        deadline = time.monotonic() + timeout
        while self.child.isalive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.child.isalive(), "the REPL did not exit"
        return self.child.exitstatus

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)


@pytest.fixture
def repl_home(embedded_model_home, tmp_path) -> Path:
    """A VICUNA_HOME of this test's own that sees the converted embedded model, so the REPL's
    input history (VICUNA_HOME/chat_history) is not shared between tests or runs."""
    home = tmp_path / "vicuna_home"
    home.mkdir()
    (home / "models").symlink_to(embedded_model_home / "models", target_is_directory=True)
    return home


@pytest.fixture
def repl_factory(repl_home):
    started: list[Repl] = []

    def start(*args: str, stderr: Path | None = None) -> Repl:
        started.append(Repl(repl_home, *args, stderr=stderr))
        return started[-1]

    try:
        yield start
    finally:
        for repl in started:
            repl.kill()


def test_ask_undo_ask_save_exit(repl_factory, repl_home, tmp_path):
    repl = repl_factory("--temperature", "0", "--max-new-tokens", "40")
    shown, first = repl.ask("What is the capital of France?")
    assert "Paris" in plain(shown).split("What is the capital of France?")[-1]
    assert first.group(3) in ("stop", "length")

    repl.command("/undo", "removed: 'What is the capital of France?'")

    shown, second = repl.ask("What is 2+2?")
    assert "4" in plain(shown).split("What is 2+2?")[-1]  # in the answer, not the question
    # Undone means not sent: the second prompt does not hold the first exchange.
    assert int(second.group(1)) < int(first.group(1)) + int(first.group(2))

    saved = tmp_path / "chat.json"
    repl.command(f"/save {saved}", f"saved 2 messages to {saved}")
    repl.line("/exit")
    assert repl.wait_exit() == 0

    data = json.loads(saved.read_text(encoding="utf-8"))
    messages = data["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "What is 2+2?"
    assert "4" in messages[1]["content"]
    assert "Paris" not in json.dumps(data)
    assert data["model"] == "smollm2-135m-instruct"
    # What was typed is kept for the next session's up-arrow.
    typed = (repl_home / "chat_history").read_text(encoding="utf-8")
    assert "What is the capital of France?" in typed and "/undo" in typed


def test_ctrl_c_stops_an_answer_and_ctrl_d_exits(repl_factory, tmp_path):
    repl = repl_factory("--temperature", "0", "--max-new-tokens", "400")
    question = "Tell me a long story about a dragon and a knight."
    repl.line(question)
    # The first words of the answer (rich clears the line, then draws the text).
    repl.expect(r"\x1b\[2K(?:\x1b\[[0-9;]*m)*\w")
    time.sleep(0.5)
    repl.child.sendcontrol("c")
    repl.expect_exact("(stopped)")
    repl.expect(PROMPT)  # the prompt is back, after the stats line
    stats = STATS.search(plain(repl.child.before))
    assert stats and stats.group(3) == "cancelled", repl.child.before
    assert 0 < int(stats.group(2)) < 400

    # /stats: a small table (name, value per row), not JSON.
    repl.command("/stats", "finish reason", "cancelled")
    table = plain(repl.transcript.getvalue()).rsplit("/stats", 1)[-1]
    assert re.search(r"decode speed +[\d.]+ tok/s", table) and re.search(r"output tokens +\d+", table), table
    assert "{" not in table

    # The partial answer is kept as the turn's answer.
    saved = tmp_path / "partial.json"
    repl.command(f"/save {saved}", "saved 2 messages")
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages[0] == {"role": "user", "content": question}
    assert messages[1]["role"] == "assistant" and messages[1]["content"].strip()

    repl.child.sendcontrol("d")
    assert repl.wait_exit() == 0


def test_bad_load_files_and_ctrl_c_at_the_prompt_keep_the_repl_running(repl_factory, tmp_path):
    repl = repl_factory("--temperature", "0", "--max-new-tokens", "8")

    missing = tmp_path / "missing.json"
    repl.command(f"/load {missing}", "error: ", f"{missing} does not exist")

    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"messages": [', encoding="utf-8")
    repl.command(f"/load {malformed}", "error: ", f"{malformed} is not valid JSON")

    not_a_chat = tmp_path / "not_a_chat.json"
    not_a_chat.write_text('{"hello": 1}', encoding="utf-8")
    repl.command(f"/load {not_a_chat}", "error: ", "holds no conversation")

    # Ctrl-C at the prompt drops the typed line; nothing is asked.
    repl.child.send("never sent")
    time.sleep(0.2)
    repl.child.sendcontrol("c")
    repl.expect(PROMPT)
    repl.command("/stats", "no answer yet")

    # Still working: a good file loads and is replayed.
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]}), encoding="utf-8")
    repl.command(f"/load {good}", "loaded 2 messages", "you: ", "Hi there", "assistant: ", "Hello! How can I help?")

    repl.line("/exit")
    assert repl.wait_exit() == 0
    assert "Traceback" not in repl.transcript.getvalue()


def test_tab_completes_slash_commands(repl_factory):
    repl = repl_factory("--max-new-tokens", "8")
    repl.child.send("/he")
    repl.expect_exact("show this help")  # the completion menu is up (complete while typing)
    repl.child.send("\t")  # picks the only match, "/help"
    time.sleep(0.3)
    repl.child.send("\r")
    # /help ran (an uncompleted "/he" would be "error: unknown command '/he'").
    repl.expect_exact("start a new conversation")
    repl.expect(PROMPT)
    assert "unknown command" not in repl.transcript.getvalue()
    repl.line("/exit")
    assert repl.wait_exit() == 0


def test_too_long_message_keeps_the_history(repl_factory, tmp_path):
    """A pasted message longer than the context is refused with one error line, and the
    conversation so far stays as it was (nothing was asked, so nothing may be lost)."""
    repl = repl_factory("--temperature", "0", "--max-new-tokens", "8")
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]}), encoding="utf-8")
    repl.command(f"/load {history}", "loaded 2 messages")

    # A bracketed paste, as a terminal sends it: one key event for the whole text.
    repl.child.send("\x1b[200~" + "word " * 9000 + "\x1b[201~")
    time.sleep(0.5)
    repl.child.send("\r")
    repl.expect_exact("error: ")
    repl.expect(PROMPT)
    assert "context holds 8192" in plain(repl.child.before)

    saved = tmp_path / "after.json"
    repl.command(f"/save {saved}", "saved ")
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ], "the refused message wiped the conversation"
    repl.line("/exit")
    assert repl.wait_exit() == 0


def test_an_answer_keeps_its_line_breaks_and_the_speed_line_stays_on_stderr(repl_factory, tmp_path):
    """A poem comes back one line per line (Markdown would join single newlines into one
    paragraph), and the per-turn speed line goes to stderr, never into the answer on stdout."""
    errors = tmp_path / "stderr.txt"
    # The lossless weights: the check needs this greedy answer's shape (single-newline lines),
    # which the int8 default (--quantize auto) changes (it breaks the poem into stanzas).
    repl = repl_factory("--temperature", "0", "--max-new-tokens", "60", "--quantize", "none", stderr=errors)
    question = "Write a short poem about the sea."
    def wait_on_stderr(text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in errors.read_text(encoding="utf-8", errors="replace"):
            assert time.monotonic() < deadline, f"{text!r} not on stderr; screen: {repl.transcript.getvalue()[-2000:]!r}"
            time.sleep(0.1)

    repl.line(question)
    wait_on_stderr("tok/s")
    saved = tmp_path / "poem.json"
    repl.line(f"/save {saved}")
    wait_on_stderr("saved 2 messages")
    # The REPL echoes what is typed only once the answer is out: everything before the echo of
    # /save is the answer's rendering.
    repl.expect_exact(str(saved))
    screen = plain(repl.transcript.getvalue()).split(question, 1)[-1].split("/save", 1)[0]
    assert STATS.search(errors.read_text(encoding="utf-8")), "the speed line is not on stderr"
    assert "tok/s" not in screen, "the speed line reached stdout"

    answer = json.loads(saved.read_text(encoding="utf-8"))["messages"][1]["content"]
    lines = [line.strip() for line in answer.split("\n") if line.strip()]
    assert len(lines) >= 3 and "\n\n" not in answer.strip(), f"not a poem of single-newline lines: {answer!r}"
    for line, following in zip(lines, lines[1:]):
        assert f"{line} {following}" not in screen, f"two lines of the answer were joined: {line!r} {following!r}"
        assert re.search(re.escape(line) + r" *\r?\n", screen), f"{line!r} does not end a screen line: {screen[-1500:]!r}"
    repl.expect(PROMPT)
    repl.line("/exit")
    assert repl.wait_exit() == 0
