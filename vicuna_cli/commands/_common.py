"""What every command shares: which flags the user actually gave."""

from __future__ import annotations

from typing import Any

import typer


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
