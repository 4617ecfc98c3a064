"""What every command shares: which flags the user actually gave, and the common option types."""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource


def given_flags(ctx: click.Context, exclude: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    """Only the options set on the command line (or env), so a `--config` file is not overridden
    by defaults the user never typed."""
    return {
        name: value
        for name, value in ctx.params.items()
        if name not in exclude
        and ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    }
