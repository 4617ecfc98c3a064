"""A model folder's own Python code never runs unless the user asks for it (issue #18, item 1).

The attack: a model directory whose config.json has an `auto_map` pointing at its own
`configuration_*.py` / `modeling_*.py`. transformers, when `trust_remote_code` is not given,
asks "Do you wish to run the custom code? [y/N]" on stdout and reads the answer from stdin, so
`printf 'y\\nWhat is 2+2?\\n' | vicuna chat -m ./that-dir` answered "y" with the user's piped
input and ran the folder's code (here: it writes a marker file). Now every transformers load goes
through `core.hf.load_pretrained` with an explicit `trust_remote_code` (False unless
`--trust-remote-code`), which a scan of the package below keeps true.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vicuna_cli"

CONFIGURATION = '''
from pathlib import Path

Path({marker!r}).write_text("the model folder's code ran")

from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
'''

MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


TOKENIZATION = '''
from pathlib import Path

Path({marker!r}).write_text("the model folder's code ran")

from transformers import PreTrainedTokenizerFast


class EvilTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def remote_code_model(bpe_model_dir, tmp_path) -> tuple[Path, Path]:
    """(model dir with auto_map + its own code, the marker file that code writes when it runs)."""
    model = tmp_path / "model-with-code"
    shutil.copytree(bpe_model_dir, model)
    marker = tmp_path / "MARKER"
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="evil_llama",
        architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                  "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(CONFIGURATION.format(marker=str(marker)))
    (model / "modeling_evil.py").write_text(MODELING)
    # The tokenizer too names code of its own, so tokenizer-only commands meet the attack as well.
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizerFast",
                            auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]})
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (model / "tokenization_evil.py").write_text(TOKENIZATION.format(marker=str(marker)))
    return model, marker


def vicuna(*args: str, input: bytes, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VICUNA_DEBUG"}
    # transformers copies trusted code into HF_MODULES_CACHE: keep it inside the test's tmp dir.
    env.update(HF_MODULES_CACHE=str(home / "hf_modules"), TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "vicuna_cli", *args], input=input, capture_output=True,
                          env=env, timeout=300)


def test_piped_yes_does_not_run_the_model_folders_code(remote_code_model, tmp_path):
    model, marker = remote_code_model
    result = vicuna("chat", "-m", str(model), "--temperature", "0", "--max-new-tokens", "4",
                    input=b"y\nWhat is 2+2?\n", home=tmp_path)
    stderr = result.stderr.decode()
    assert not marker.exists(), "the model folder's code ran"
    assert result.returncode == 1, stderr
    assert "--trust-remote-code" in stderr
    assert "please report it" not in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""  # no library prompt ("Do you wish to run the custom code?") on stdout


def test_trust_remote_code_flag_runs_it(remote_code_model, tmp_path):
    model, marker = remote_code_model
    result = vicuna("chat", "-m", str(model), "--trust-remote-code", "--temperature", "0", "--max-new-tokens", "4",
                    input=b"What is 2+2?\n", home=tmp_path)
    assert marker.exists(), result.stderr.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 1  # one answer for the one prompt
    assert "transformers" in result.stderr.decode()  # the model's own code needs transformers, not the native path


def _calls_outside_the_door() -> list[str]:
    """`x.from_pretrained(...)` calls anywhere in the package except inside core.hf.load_pretrained,
    and engine constructors that would load a model without an explicit trust_remote_code."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        door = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "load_pretrained"
                and path.name == "hf.py" for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in door:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            explicit = any(k.arg == "trust_remote_code" for k in node.keywords)
            if name == "from_pretrained" or (name in ("AsyncEngineArgs", "EngineArgs", "LLM", "pipeline") and not explicit):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}(...)")
    return found


def test_every_transformers_load_goes_through_the_one_door():
    assert _calls_outside_the_door() == []


def _conversations(path: Path) -> Path:
    turns = [{"from": "human", "value": "Hello there, how are you?"}, {"from": "gpt", "value": "I am fine, thank you."}]
    path.write_text(json.dumps([{"id": f"c{i}", "conversations": turns} for i in range(4)]))
    return path


def _commands(model: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every command that loads a model (or its tokenizer) from a folder, as a user runs it."""
    data = str(_conversations(tmp_path / "data.json"))
    return {
        "serve worker": ["serve", "worker", "-m", str(model), "--port", "0", "--advertise", "http://127.0.0.1:9",
                         "--controller", "http://127.0.0.1:9", "--device", "cpu"],
        "train sft": ["train", "sft", "-m", str(model), "--data", data, "-o", str(tmp_path / "run"), "--max-steps", "1",
                      "--global-batch-size", "1", "--max-length", "64", "--device", "cpu"],
        "train inspect-data": ["train", "inspect-data", "-m", str(model), "--data", data],
        "templates show": ["templates", "show", "auto", "-m", str(model)],
        "data stats": ["data", "stats", data, "-m", str(model), "-j", "1"],
    }


@pytest.mark.parametrize("command", ["serve worker", "train sft", "train inspect-data", "templates show", "data stats"])
def test_every_loading_command_refuses_the_models_code(command, remote_code_model, tmp_path):
    model, marker = remote_code_model
    if command == "data stats":  # with a tokenizer.json the data commands never use transformers' tokenizers
        (model / "tokenizer.json").unlink()
    result = vicuna(*_commands(model, tmp_path)[command], input=b"y\ny\n", home=tmp_path)
    stderr = result.stderr.decode()
    assert not marker.exists(), f"{command} ran the model folder's code"
    assert result.returncode == 1, stderr
    assert "--trust-remote-code" in stderr and "please report it" not in stderr


@pytest.mark.parametrize("command", ["train sft", "templates show", "data stats"])
def test_the_flag_reaches_the_loader(command, remote_code_model, tmp_path):
    model, marker = remote_code_model
    if command == "data stats":
        (model / "tokenizer.json").unlink()
    vicuna(*_commands(model, tmp_path)[command], "--trust-remote-code", input=b"", home=tmp_path)
    assert marker.exists(), f"{command} --trust-remote-code did not pass the flag down"


def test_serve_passes_the_flag_to_every_worker_it_starts():
    from vicuna_cli.serve.config import ServeConfig
    from vicuna_cli.serve.launcher import plan

    def workers(config: ServeConfig) -> list[list[str]]:
        return [args for role, args in plan(config) if role.startswith("worker")]

    trusted = workers(ServeConfig(model=["a", "b"], trust_remote_code=True))
    assert len(trusted) == 2 and all("--trust-remote-code" in args for args in trusted)
    assert not any("--trust-remote-code" in args for args in workers(ServeConfig(model=["a"])))
