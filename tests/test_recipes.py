"""SkyPilot recipes: valid YAML of the expected shape, spot instances, and a `run:` that only calls
vicuna (around shell plumbing: a venv, a background server, a bounded wait loop, progress lines).
Loading them with SkyPilot's own loader and parsing each vicuna line: tests/test_launch.py."""

from pathlib import Path

import pytest
import yaml

from vicuna_cli.launch.recipe import RUN_PLUMBING, simple_commands

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_shape_and_run_lines(path):
    recipe = yaml.safe_load(path.read_text())
    assert set(recipe) <= {"name", "resources", "envs", "workdir", "setup", "run", "num_nodes", "file_mounts", "service"}
    assert recipe["resources"].get("use_spot") is True
    commands = simple_commands(recipe["run"])
    assert any(words[0] == "vicuna" for words in commands)
    for words in commands:
        assert words[0] == "vicuna" or words[0] in RUN_PLUMBING, f"{path.name}: run line does not call vicuna: {words}"


def test_run_lines_that_carry_logic_are_refused():
    assert simple_commands("vicuna chat -p hi && python -c 'print(1)'")[1][0] not in RUN_PLUMBING | {"vicuna"}


@pytest.mark.parametrize("path", [p for p in RECIPES if "train" in p.name], ids=lambda p: p.name)
def test_training_recipes_resume_under_a_stable_run_name_and_install_no_flash_attn(path):
    recipe = yaml.safe_load(path.read_text())
    train = [w for w in simple_commands(recipe["run"]) if w[:3] == ["vicuna", "train", "sft"]]
    assert len(train) == 1
    words = train[0]
    assert words[words.index("--resume") + 1] == "auto"
    assert words[words.index("--run-name") + 1] == "$SKYPILOT_TASK_ID"
    assert recipe["resources"]["job_recovery"]
    # flash-attn on PyPI is a source package whose build imports torch: pip's build isolation fails.
    assert "flash" not in recipe["setup"] and "[gpu" not in recipe["setup"] and ",gpu" not in recipe["setup"]
