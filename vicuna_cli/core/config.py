"""Typed command configs. Precedence: defaults < `--config file.yaml` < flags given on the command line.

Validation happens here, once, with messages that name the flag a user would change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import VicunaError
from .store import atomic_write_text

C = TypeVar("C", bound="CommandConfig")


class CommandConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise VicunaError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise VicunaError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise VicunaError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], flags: dict[str, Any], config_file: Path | None = None) -> C:
    """`flags` holds only the options the user gave on the command line."""
    values = load_config_file(config_file) if config_file else {}
    values.update(flags)
    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        source = "" if field in flags else f" (from {config_file})" if config_file else ""
        if first["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            raise VicunaError(f"unknown option {field!r}{source}", hint=f"known options: {known}") from None
        if not field:  # a check across several options (a model validator) names them itself
            raise VicunaError(str(first["msg"]).removeprefix("Value error, ")) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise VicunaError(f"{flag(field)}{source}: {message}") from None


def save_config(config: CommandConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
