"""README.md's generated CLI reference (scripts/cli_reference.py) matches the app: a changed option,
default or help text fails here until `python scripts/cli_reference.py --write` is run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_cli_reference_is_the_generated_one():
    script = _script()
    section = script.current((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section is not None, "README.md lost the cli-reference markers"
    assert section == script.render(), "README.md's CLI reference is stale: run python scripts/cli_reference.py --write"


def test_every_command_and_option_of_the_app_is_in_the_reference():
    """The generator walks the whole app: each visible command has its heading and each option its
    row (so a command or option left out by the walk would fail, not just a changed one)."""
    script = _script()
    rendered = script.render()
    paths = [path for path, _ in script.commands()]
    assert {"vicuna chat", "vicuna serve worker", "vicuna train sft", "vicuna judge show", "vicuna data clean"} <= set(paths)
    for path, command in script.commands():
        block = rendered.split(f"#### `{path}`\n", 1)[1].split("\n#### ", 1)[0]
        for param in command.params:
            if not param.hidden and not type(param).__name__.endswith("Argument"):
                assert f"`{param.opts[0]}`" in block, (path, param.opts)


def test_check_fails_on_a_stale_readme(tmp_path, monkeypatch):
    script = _script()
    readme = tmp_path / "README.md"
    stale = script.render().replace("Sampling temperature; 0 = greedy.", "Sampling temperature.")
    assert stale != script.render()
    readme.write_text(f"# x\n\n{stale}\nafter\n", encoding="utf-8")
    monkeypatch.setattr(script, "README", readme)
    monkeypatch.setattr(sys, "argv", ["cli_reference.py", "--check"])
    assert script.main() == 1
    monkeypatch.setattr(sys, "argv", ["cli_reference.py", "--write"])
    assert script.main() == 0
    assert readme.read_text(encoding="utf-8") == f"# x\n\n{script.render()}\nafter\n"


def test_the_script_runs_as_a_command():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
