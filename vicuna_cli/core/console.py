"""Output discipline: results go to stdout, everything else (progress, logs, speed) to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

# soft_wrap on stdout so piped results are never re-wrapped at the terminal width.
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# Messages are plain text (they may hold "[INST]" or paths with brackets): never parse as markup.


def info(message: str) -> None:
    err.print(Text(message, style="dim"))


def warn(message: str) -> None:
    err.print(Text.assemble(("warning: ", "yellow"), message))


def print_error(message: str, hint: str | None = None) -> None:
    err.print(Text.assemble(("error: ", "bold red"), message))
    if hint:
        err.print(Text.assemble(("hint: ", "dim"), hint))
