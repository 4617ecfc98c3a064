"""SkyPilot recipes: valid YAML of the expected shape, and `run:` only calls vicuna."""

from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_shape_and_run_lines(path):
    recipe = yaml.safe_load(path.read_text())
    assert set(recipe) <= {"name", "resources", "envs", "workdir", "setup", "run", "num_nodes", "file_mounts", "service"}
    assert recipe["resources"].get("use_spot") is True
    commands = [line.strip() for line in recipe["run"].splitlines() if line.strip()]
    # Continuation lines (ending in "\") belong to the vicuna command above them.
    logical, joined = [], ""
    for line in commands:
        joined += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            logical.append(joined.strip())
            joined = ""
    for command in logical:
        if command.startswith((". ", "source ")):  # activating the venv made in setup
            continue
        assert command.startswith("vicuna "), f"{path.name}: run line does not call vicuna: {command}"
