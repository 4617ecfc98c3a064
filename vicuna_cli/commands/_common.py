"""What every command shares: options derived from the command's config model (declared once,
there: default, help, validation), and which flags the user actually gave."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

import typer

from ..core.hf import TRUST_REMOTE_CODE_HELP

# Commands whose options are not (yet) fields of a config (data clean) still share this declaration.
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)

CONFIG_HELP = "YAML file of options; flags override it."


def given_flags(ctx: typer.Context, exclude: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    """Only the options set on the command line (or env), so a `--config` file is not overridden
    by defaults the user never typed."""
    flags = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        # Compared by name: typer ships its own click-compatible ParameterSource enum.
        if name not in exclude and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            flags[name] = value
    return flags


def cli_type(annotation: Any) -> Any:
    """The type typer parses a config field's value as; pydantic validates it afterwards (so a
    Literal or a spelling-normalised Dtype reaches the config as the string the user typed)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return cli_type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return cli_type(inner[0]) if len(inner) == 1 else str
    if origin is typing.Literal:
        return str
    if origin is list:
        return List[cli_type(typing.get_args(annotation)[0])]
    if origin is tuple:
        return typing.Tuple[tuple(cli_type(a) for a in typing.get_args(annotation))]
    return annotation if annotation in (str, int, float, bool, Path) else str


def config_params(config: type, names: dict[str, Any], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per field of `config`: its default and help are the field's.

    `names` gives a field its flags (`("-m", "--model")`) or a dict of typer.Option arguments
    (`{"param_decls": (...), "envvar": ...}`, plus `annotation` when the flag's text is parsed by
    the config); the others are `--field-name`."""
    params = []
    for field, info in config.model_fields.items():
        if field in skip:
            continue
        spec = names.get(field, ())
        kwargs = dict(spec) if isinstance(spec, dict) else {"param_decls": tuple(spec)}
        decls = kwargs.pop("param_decls", ()) or ("--" + field.replace("_", "-"),)
        argument = kwargs.pop("argument", False)
        # A required option is left to the config to report ("--base: Field required", exit 1),
        # like every other invalid value; a required argument is click's to ask for.
        default = ... if argument and info.is_required() else None if info.is_required() else info.get_default(call_default_factory=True)
        # A flag may take a form the config's validator parses (`--price 2,8` for a pair of floats).
        annotation = kwargs.pop("annotation", None) or cli_type(info.annotation)
        if isinstance(default, (list, tuple)) or default is None:
            default = None  # typer's empty list or unset: the config's default applies
            annotation = Optional[annotation]
        kwargs.setdefault("show_default", default not in (None, "", ...))
        if argument:  # a positional argument: its decls are not flags
            option = typer.Argument(default, help=info.description, **kwargs)
        else:
            option = typer.Option(default, *decls, help=info.description, **kwargs)
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def derived(config: type, names: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
            extra: list[inspect.Parameter] | None = None, config_option: bool = True) -> Callable:
    """Give a command the options of `config` (plus `extra` ones the config does not hold, such as
    --json), so its CLI cannot drift from the config; the body takes (ctx, **options)."""

    def wrap(fn: Callable) -> Callable:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        params += config_params(config, names or {}, skip) + list(extra or [])
        if config_option:
            params.append(option_param("config", Optional[Path], None, "--config", help=CONFIG_HELP))
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        fn.__vicuna_config__ = config  # type: ignore[attr-defined]  # read by tests/test_options.py
        fn.__vicuna_skip__ = skip  # type: ignore[attr-defined]  # config fields the command does not offer
        return fn

    return wrap


def option_param(name: str, annotation: Any, default: Any, *decls: str, **kwargs: Any) -> inspect.Parameter:
    """A command option that is not a config field (--json, --dry-run, --config)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, **kwargs))


def build(ctx: typer.Context, config: type, exclude: tuple[str, ...] = ("config",)) -> Any:
    """The command's config from --config and the flags given (unset list/None flags dropped)."""
    from ..core.config import build_config

    flags = {k: v for k, v in given_flags(ctx, exclude).items() if v is not None}
    return build_config(config, flags, ctx.params.get("config"))
