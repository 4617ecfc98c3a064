"""`vicuna train sft --accelerate-config FILE`: run the same command under `accelerate launch`.

Recipes (SkyPilot `run:` lines) only call `vicuna ...`; this turns such a line into
`accelerate launch --config_file FILE -m vicuna_cli train sft <the other flags>` by replacing the
current process (so the launcher receives SIGTERM and passes it on to every rank).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..core.errors import VicunaError

FLAGS = ("--accelerate-config", "--num-processes")


def launched() -> bool:
    """True inside a process started by accelerate/torchrun (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def strip_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in FLAGS)):
            out.append(arg)
    return out


def launch_command(config_file: Path, num_processes: int | None, argv: list[str]) -> list[str]:
    """The accelerate command for `vicuna <argv>` (argv from `train` on)."""
    if not config_file.is_file():
        raise VicunaError(f"--accelerate-config {config_file} does not exist",
                          hint="use one of recipes/accelerate/*.yaml (ddp, fsdp, zero3)")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "vicuna_cli", *strip_flags(argv)]


def relaunch(config_file: Path, num_processes: int | None) -> None:
    argv = sys.argv[1:]
    at = argv.index("train") if "train" in argv else 0
    command = launch_command(config_file, num_processes, argv[at:])
    os.execv(command[0], command)


def run_method(make_config: Callable[[], Any], run: Callable[[Any], Any], accelerate_config: Path | None,
               num_processes: int | None) -> Any:
    """A `vicuna train` method from its command: relaunched under accelerate when asked (before the
    config is built, so each rank builds its own), then run; a signal's stop is a one-line error
    with the exit code of that signal (the checkpoint is saved by then)."""
    from .loop import Stop

    if accelerate_config is not None and not launched():
        relaunch(accelerate_config, num_processes)
    config = make_config()
    try:
        return run(config)
    except Stop as stop:
        raise VicunaError(f"stopped by {stop.signame} after step {stop.step}; checkpoint saved to {stop.path}",
                          hint="continue with the same command plus --resume auto",
                          exit_code=130 if stop.signame == "SIGINT" else 143) from None
