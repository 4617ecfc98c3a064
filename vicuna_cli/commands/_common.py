"""What every command shares: which flags the user actually gave."""

from __future__ import annotations

from typing import Any

import typer

from ..core.hf import TRUST_REMOTE_CODE_HELP
from ..core.threads import THREADS_HELP

# Every command that loads a model takes this flag, with the same meaning (core/hf.py).
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)
# ... and this one: torch threads (the default, None, is the config's: adapt to the free CPUs).
QUANTIZE = typer.Option("none", "--quantize", help="Weights: none (lossless), int8 (native Llama path, CPU, bf16), or auto (int8 where it can run, else none).")
THREADS = typer.Option(None, "--threads", help=THREADS_HELP, show_default=False)


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
