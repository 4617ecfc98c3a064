"""The `vicuna` command. Each group is registered in one line; command bodies import heavy
libraries (torch, transformers) themselves, so `vicuna --help` answers instantly."""

from __future__ import annotations

import os
import sys

import typer

from . import __version__
from .commands import apply_delta, chat, data, judge, launch, models, rm, serve, templates, train

app = typer.Typer(
    name="vicuna",
    help="Make a chat model the Vicuna way: data, training, weight deltas, serving, chat and judging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(templates.app, name="templates")
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(serve.app, name="serve")
app.add_typer(judge.app, name="judge")
app.add_typer(train.app, name="train")
app.add_typer(rm.app, name="rm")
app.command("chat")(chat.chat)
app.command("apply-delta", help=apply_delta.APPLY_DELTA_HELP)(apply_delta.apply_delta)
app.command("make-delta", help=apply_delta.MAKE_DELTA_HELP)(apply_delta.apply_delta)
app.command("merge-lora", help=apply_delta.MERGE_LORA_HELP)(apply_delta.apply_delta)
app.command("launch", help=launch.LAUNCH_HELP)(launch.launch)

_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vicuna {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    global _debug
    _debug = debug


def main() -> None:
    from .core.console import print_error
    from .core.errors import VicunaError

    try:
        app(standalone_mode=True)
    except VicunaError as exc:
        if _debug or os.environ.get("VICUNA_DEBUG"):
            import traceback

            traceback.print_exc()
        print_error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except SystemExit as exc:
        # typer turns a Ctrl-C inside a command into a silent `sys.exit(130)`; say what happened.
        if exc.code == 130 and _caused_by_interrupt(exc):
            print_error("interrupted")
        raise
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if _debug or os.environ.get("VICUNA_DEBUG"):
            raise
        print_error(f"{type(exc).__name__}: {exc}", hint="run again with --debug for the traceback, and please report it")
        sys.exit(2)


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):  # the chain is short; bounded in case of a cycle
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


if __name__ == "__main__":
    main()
