"""What users feed `vicuna chat` that is not a clean question: bytes that are not UTF-8 on stdin
(issue #18, item 12) and a model whose chat template the Jinja sandbox blocks (item 13). Both are
the user's input, so both must end as answers or user errors (exit 1), never as a crash (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vicuna_cli.core.errors import VicunaError


def chat(*args: str, input: bytes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VICUNA_DEBUG"}
    return subprocess.run([sys.executable, "-m", "vicuna_cli", "chat", *args], input=input, capture_output=True,
                          env=env, timeout=300)


def test_invalid_utf8_on_stdin_is_replaced_and_every_line_answered(bpe_model_dir):
    lines = b"caf\xe9 \xff\xfe?\nHello there\nand \xc3\x28 again\nthe end\n"
    result = chat("-m", str(bpe_model_dir), "--temperature", "0", "--max-new-tokens", "3", "--json", input=lines)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == ["caf\ufffd \ufffd\ufffd?", "Hello there", "and \ufffd( again", "the end"]
    assert stderr.count("not valid UTF-8: its undecodable bytes were replaced") == 1  # said once
    assert "2 inputs were not valid UTF-8" in stderr  # and counted at the end
    assert "please report it" not in stderr


def test_invalid_utf8_in_a_prompt_argument(bpe_model_dir):
    result = chat("-m", str(bpe_model_dir), "--temperature", "0", "--max-new-tokens", "3",
                  "-p", os.fsdecode(b"caf\xe9"), "-p", "Hello there", input=b"")
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 2


# -- a chat template the sandbox blocks -------------------------------------------------------

BLOCKED = "{{ messages.append({'role': 'user', 'content': 'injected'}) }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
FAILING = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.mark.parametrize("implementation", ["native", "transformers"])
@pytest.mark.parametrize("template, says", [(BLOCKED, "chat template is unsafe"), (FAILING, "roles must alternate")])
def test_a_chat_template_that_fails_is_a_user_error(bpe_model_dir, tmp_path, implementation, template, says):
    from vicuna_cli.chat.backends import LocalBackend

    model = _with_template(bpe_model_dir, tmp_path / "model", template)
    backend = LocalBackend(str(model), None, device="cpu", dtype="float32", implementation=implementation)
    with pytest.raises(VicunaError, match=says) as error:
        backend.prompt_ids([{"role": "user", "content": "hi"}])
    assert "--template" in error.value.hint


def test_chat_with_a_blocked_template_exits_1_and_names_the_way_out(bpe_model_dir, tmp_path):
    model = _with_template(bpe_model_dir, tmp_path / "model", BLOCKED)
    result = chat("-m", str(model), "-p", "hi", input=b"")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "chat template is unsafe" in stderr and "--template NAME" in stderr
    assert "please report it" not in stderr
    fixed = chat("-m", str(model), "-p", "hi", "--template", "vicuna_v1.1", "--max-new-tokens", "2", input=b"")
    assert fixed.returncode == 0, fixed.stderr.decode()
