"""Load a recipe with SkyPilot's own task loader, apply `--env`, and read what `vicuna launch`
needs from it: its kind (managed job, service or cluster), the `vicuna ...` commands in its
`setup`/`run`, and the duration its header states for the cost estimate."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core import console
from ..core.errors import VicunaError
from ..core.extras import require

# `# Estimate: 24 hours ...` in a recipe's header: the duration the dry-run cost is computed for.
_HOURS = re.compile(r"^#\s*estimate:\s*([0-9]+(?:\.[0-9]+)?)\s*h(?:ours?)?\b", re.IGNORECASE | re.MULTILINE)
# Shell plumbing a recipe's `run` may use around its `vicuna` commands (activating a venv, a
# background server and its cleanup, a bounded wait loop, progress lines); anything else would be
# logic the CLI should have, so tests/test_recipes.py refuses it.
RUN_PLUMBING = {".", "source", "set", "trap", "kill", "wait", "sleep", "for", "done", "break", "fi", "exit",
                "echo", "[", "test", "true", "false", "export", "mkdir"}
_KEYWORDS = {"do", "then", "else", "until", "while", "if", "!", "{", "}"}
_DUP_FD = re.compile(r"\d*>&\d+")
_REDIRECT = re.compile(r"\d*(?:>>?|<)")
_REDIRECT_ATTACHED = re.compile(r"\d*(?:>>?|<)\S+")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")  # `VAR=value` before a command, or alone


@dataclass
class Recipe:
    path: Path
    task: Any  # sky.Task
    config: dict[str, Any]  # the YAML as written (before --env)
    kind: str  # job, service or cluster
    hours: float | None
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.task.name or self.path.stem

    def accelerators(self) -> list[dict[str, int]]:
        """One dict per candidate resource that asks for accelerators (empty: CPU only)."""
        return [dict(r.accelerators) for r in self.task.resources if r.accelerators]


def parse_env(items: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """`KEY=VALUE`, or `KEY` alone to pass this shell's $KEY (as `sky launch --env KEY` does)."""
    environ = os.environ if environ is None else environ
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise VicunaError(f"--env {item!r}: expected KEY=VALUE with a shell variable name as KEY")
        if not sep:
            if key not in environ:
                raise VicunaError(f"--env {key}: ${key} is not set in this shell", hint=f"use --env {key}=VALUE")
            value = environ[key]
        pairs[key] = value
    return pairs


def load(path: Path, env: dict[str, str] | None = None, kind: str = "auto") -> Recipe:
    sky = require("sky", "sky", "vicuna launch")
    path = Path(path)
    if not path.is_file():
        raise VicunaError(f"recipe {path} does not exist", hint="the recipes are in recipes/*.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise VicunaError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(config, dict):
        raise VicunaError(f"{path}: a recipe is a mapping (name, resources, envs, setup, run, ...)")
    env = dict(env or {})
    declared = config.get("envs") or {}
    for key in env:
        if key not in declared:
            known = ", ".join(declared) or "none"
            console.warn(f"--env {key}: {path.name} does not use this variable (its envs: {known}); passing it anyway")
    try:
        # from_yaml_config applies the overrides before it builds storage mounts, whose bucket
        # names may come from envs (e.g. name: ${CHECKPOINT_BUCKET}).
        task = sky.Task.from_yaml_config(dict(config), env_overrides=list(env.items()) or None)
    except Exception as exc:  # SkyPilot raises ValueError subclasses and its own config errors
        raise VicunaError(f"{_locate(path, text, str(exc))}: SkyPilot rejects the recipe: {_first_line(exc)}",
                          hint="see https://docs.skypilot.co/en/latest/reference/yaml-spec.html") from None
    return Recipe(path, task, config, _kind(task, kind), _hours(text), env)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def _locate(path: Path, text: str, message: str) -> str:
    """`file:line` of the first key SkyPilot's message names (quoted), else just the file."""
    for name in re.findall(r"'([A-Za-z_][\w-]*)'", message):
        match = re.search(rf"^\s*{re.escape(name)}\s*:", text, re.MULTILINE)
        if match:
            return f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
    return str(path)


def _kind(task: Any, requested: str) -> str:
    if requested != "auto":
        return requested
    if task.service is not None:
        return "service"
    if any(getattr(r, "job_recovery", None) for r in task.resources):
        return "job"
    return "cluster"


def _hours(text: str) -> float | None:
    match = _HOURS.search(text)
    return float(match.group(1)) if match else None


def logical_lines(script: str | None) -> list[str]:
    """The script's commands with `\\` continuations joined and comments dropped."""
    lines, joined = [], ""
    for raw in (script or "").splitlines():
        line = raw.strip()
        if not joined and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        lines.append((joined + line).strip())
        joined = ""
    if joined.strip():
        lines.append(joined.strip())
    return lines


def simple_commands(script: str | None) -> list[list[str]]:
    """Every simple command of the script as words, split at `;`, `&&`, `||`, `|` and `&`,
    without leading shell keywords (`do`, `then`, `until`, ...) and variable assignments. Enough
    shell for recipes: quotes are honoured; variables stay unexpanded (`"$MODEL"` is one word)."""
    commands = []
    for line in logical_lines(script):
        line = _DUP_FD.sub(" ", line)  # `2>&1` is a redirection, not a background `&`
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        try:
            tokens = _drop_redirections(list(lexer))
        except ValueError as exc:
            raise VicunaError(f"cannot parse the shell line {line!r}: {exc}") from None
        for token in tokens + [";"]:
            if token and set(token) <= set(";&|"):
                if words:
                    commands.append(words)
                words = []
            elif words or (token not in _KEYWORDS and not _ASSIGNMENT.fullmatch(token)):
                words.append(token)
    return commands


def _drop_redirections(tokens: list[str]) -> list[str]:
    kept, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif _REDIRECT.fullmatch(token):
            skip = True  # `> file`: the target is the next word
        elif not _REDIRECT_ATTACHED.fullmatch(token):
            kept.append(token)
    return kept


def vicuna_commands(script: str | None) -> list[list[str]]:
    """The `vicuna ...` commands of a setup/run script, as argument lists after `vicuna`."""
    return [words[1:] for words in simple_commands(script) if words[0] == "vicuna"]
