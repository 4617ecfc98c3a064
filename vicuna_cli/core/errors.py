"""One error type for everything a user can get wrong; the CLI's single handler prints it."""

from __future__ import annotations


class VicunaError(Exception):
    """A failure the user can act on: a one-line message and an optional hint.

    The CLI prints `error: message` in red and the hint below it on stderr, then exits with
    `exit_code`; the traceback is shown only with `--debug`.
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for the one-line error message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def unknown_choice(kind: str, name: str, choices: list[str], hint: str | None = None) -> VicunaError:
    """The error for an unknown name: it always lists the valid ones."""
    listed = ", ".join(sorted(choices)) or "(none)"
    return VicunaError(f"unknown {kind} {name!r}; known: {listed}", hint)
