"""Each command's options are declared once, in its config model, and the CLI is derived from it:
this walks the whole `vicuna` tree and fails on any flag whose default, help or type differs from
its config field, on a config field with no flag, and on a command nobody has accounted for."""

from __future__ import annotations

import inspect
from typing import Optional

import pytest
import typer

from vicuna_cli.cli import app
from vicuna_cli.commands._common import build, cli_type
from vicuna_cli.core.choices import DEVICE_SPELLINGS, DTYPE_SPELLINGS, device_name, dtype_name

ROOT = typer.main.get_command(app)

# Commands whose flags are still written in the command module (no config, or a config without
# help text yet): each is named with where its options live, so a new command cannot slip by.
NOT_DERIVED = {
    "launch": "two configs behind one command (LaunchConfig for RECIPE, ManageConfig for status|logs|down)",
    "templates": "the listing's display flag", "templates show": "two display flags, no config",
    "models list": "one display flag", "models pull": "one argument",
    "serve status": "reads its --controller default and help from ApiConfig",
    "judge questions": "two display flags", "judge show": "display flags of a report",
    "judge arena export": "two paths",
}


# Config fields a command deliberately does not offer, and why: a skip is a decision, not a leak.
SKIPPED = {
    "serve": {"insecure"},  # `vicuna serve` never offered it: beyond loopback it takes --secret
    "train ppo": {"data", "eval_split", "eval_data", "eval_every", "global_batch_size", "global_batch_tokens"},
}

# Flags given as text that the config's validator parses (`--price 2,8` into two floats).
PARSED_BY_CONFIG = {("judge", "price")}


def _walk(command, path=()):
    yield " ".join(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, (*path, name))


COMMANDS = {path: command for path, command in _walk(ROOT) if path}
DERIVED = {path: c for path, c in COMMANDS.items() if getattr(c.callback, "__vicuna_config__", None)}


def _options(command):
    return [p for p in command.params if p.name not in ("help",)]


def test_every_command_is_derived_or_accounted_for():
    with_options = {path for path, c in COMMANDS.items() if _options(c)}
    unaccounted = with_options - set(DERIVED) - set(NOT_DERIVED)
    assert not unaccounted, f"commands with options neither derived from a config nor listed: {sorted(unaccounted)}"
    stale = set(NOT_DERIVED) & set(DERIVED)
    assert not stale, f"derived now, drop from NOT_DERIVED: {sorted(stale)}"
    assert {"chat", "serve", "serve worker", "serve controller", "serve api", "judge", "judge answer", "data fetch", "data clean", "data stats", "data pairs", "data mix", "apply-delta", "make-delta", "merge-lora",
            "train sft", "train rm", "train dpo", "train ppo", "train inspect-data", "rm score"} <= set(DERIVED)


@pytest.mark.parametrize("path", sorted(DERIVED))
def test_flags_match_the_config(path):
    command = DERIVED[path]
    config = command.callback.__vicuna_config__
    skip = set(command.callback.__vicuna_skip__)
    assert skip == SKIPPED.get(path, set()), f"{path}: skips {sorted(skip)}"
    fields = config.model_fields
    signature = inspect.signature(command.callback)
    extras = {"config"} | {name for name in signature.parameters if name not in fields and name != "ctx"}
    seen = set()
    for param in _options(command):
        if param.name in extras:
            continue
        assert param.name in fields, f"{path}: --{param.name} is not a field of {config.__name__}"
        seen.add(param.name)
        field = fields[param.name]
        if field.is_required():  # an option is reported missing by the config (naming the flag); an argument by click
            assert param.required == (param.param_type_name == "argument") and param.default is None, f"{path} {param.opts}"
        else:
            default = field.get_default(call_default_factory=True)
            expected = None if default is None or isinstance(default, (list, tuple)) else default
            assert param.default == expected, f"{path} {param.opts}: default {param.default!r}, config {expected!r}"
        assert param.help == field.description and param.help, f"{path} {param.opts}: help differs from the config's"
        annotation = param.type_descriptor.annotation
        wanted = str if (path, param.name) in PARSED_BY_CONFIG else cli_type(field.annotation)
        assert annotation in (wanted, Optional[wanted]), f"{path} {param.opts}: type {annotation}, config {wanted}"
    missing = set(fields) - seen - skip
    assert not missing, f"{path}: fields of {config.__name__} with no flag: {sorted(missing)}"


# What a command needs besides the flag under test to make a valid config.
REQUIRED = {
    "apply-delta": ["--base", "b", "--delta", "d", "-o", "o"],
    "make-delta": ["--base", "b", "--make", "--target", "t", "-o", "o"],
    "merge-lora": ["--base", "b", "--lora", "a", "-o", "o"],
    "rm score": ["pairs.jsonl", "-m", "rm-run"],
}


def _parse(path: str, args: list[str]):
    """The config a command would run with, from a real parse of its arguments."""
    command = COMMANDS[path]
    ctx = command.make_context(path.split()[-1], [*REQUIRED.get(path, []), *args])
    return build(ctx, command.callback.__vicuna_config__)


def _flags_parsed_by(parser):
    """(command, field) for every flag whose config field runs `parser` on its value."""
    return sorted((path, name) for path, c in DERIVED.items()
                  for name, field in c.callback.__vicuna_config__.model_fields.items()
                  if name in {p.name for p in c.params} and any(getattr(m, "func", None) is parser for m in field.metadata))


def test_the_spelling_flags_are_found():
    names = {name for _, name in _flags_parsed_by(dtype_name) + _flags_parsed_by(device_name)}
    assert {"dtype", "precision", "rollout_dtype", "device", "reward_device"} <= names


@pytest.mark.parametrize("path,name", _flags_parsed_by(dtype_name))
def test_every_dtype_flag_takes_every_spelling(path, name):
    flag = "--" + name.replace("_", "-")
    for canonical, spellings in DTYPE_SPELLINGS.items():
        for spelling in (*spellings, spellings[-1].upper()):
            assert getattr(_parse(path, [flag, spelling]), name) == canonical, (path, spelling)
    with pytest.raises(Exception) as caught:
        _parse(path, [flag, "int3"])
    assert "bfloat16 (bf16" in str(caught.value) and flag in str(caught.value)


@pytest.mark.parametrize("path,name", _flags_parsed_by(device_name))
def test_every_device_flag_takes_every_spelling(path, name):
    flag = "--" + name.replace("_", "-")
    offered = ("auto", "cpu", "CPU", "cuda", "gpu")
    if "Literal" not in str(COMMANDS[path].callback.__vicuna_config__.model_fields[name].annotation):
        offered += ("cuda:1", "GPU:0", "mps")  # not training: one process per device there
    for spelling in offered:
        assert getattr(_parse(path, [flag, spelling]), name) == device_name(spelling)
    with pytest.raises(Exception) as caught:
        _parse(path, [flag, "tpu"])
    assert flag in str(caught.value)


def test_spellings_parse_to_one_canonical_name_and_errors_list_them():
    assert dtype_name("BF16") == dtype_name("bfloat16") == "bfloat16"
    assert dtype_name("half") == "float16" and dtype_name("fp32") == dtype_name("float") == "float32"
    assert device_name("GPU") == "cuda" and device_name("cuda:2") == "cuda:2" and device_name("gpu:1") == "cuda:1"
    assert set(DEVICE_SPELLINGS) == {"auto", "cpu", "cuda", "mps"}
    for bad, parse in (("fp8", dtype_name), ("cuda:x", device_name), ("cpu:1", device_name)):
        with pytest.raises(ValueError) as caught:
            parse(bad)
        assert repr(bad) in str(caught.value) and "known:" in str(caught.value)


def test_the_python_api_takes_the_cli_defaults():
    """A default written twice drifted once (worker expiry: 6 s in the Python API, 15 s on the CLI)."""
    from vicuna_cli.serve import api, controller
    from vicuna_cli.serve.config import ApiConfig, ControllerConfig

    assert inspect.signature(controller.create_app).parameters["expiry"].default == ControllerConfig().expiry == 15.0
    assert inspect.signature(api.create_app).parameters["worker_timeout"].default == ApiConfig().worker_timeout == 15.0


def test_serve_hands_every_engine_option_to_its_workers():
    from vicuna_cli.serve.config import EngineOptions, ServeConfig, WorkerConfig
    from vicuna_cli.serve.launcher import plan

    assert set(EngineOptions.model_fields) <= set(WorkerConfig.model_fields) & set(ServeConfig.model_fields)
    config = _parse("serve", ["-m", "a", "--dtype", "bf16", "--device", "gpu", "--max-batch-size", "3", "--threads", "1",
                              "--trust-remote-code", "--template", "vicuna_v1.1", "--heartbeat", "1.5"])
    worker_args = [args for role, args in plan(config) if role.startswith("worker")][0]
    worker = _parse("serve worker", worker_args[1:])
    for field in EngineOptions.model_fields:
        assert getattr(worker, field) == getattr(config, field), field
