"""`vicuna chat`: talk to a local model or an OpenAI-compatible server. The options are the
fields of chat/runner.py's ChatConfig (default, help, validation declared there once)."""

from __future__ import annotations

from typing import Any

import typer

from ..chat.runner import ChatConfig
from ._common import build, derived

NAMES: dict[str, Any] = {
    "model": ("-m", "--model"),
    "template": ("--template", "-t"),
    "api_key": {"param_decls": ("--api-key",), "envvar": "OPENAI_API_KEY", "show_envvar": False},
    "prompt": ("--prompt", "-p"),
    "json_output": ("--json",),
}


@derived(ChatConfig, NAMES)
def chat(ctx: typer.Context, **options: Any) -> None:
    """Chat in the terminal (a REPL with /help), or answer prompts from --prompt or stdin lines.

    Interactive when stdin is a terminal and no --prompt is given. Answers go to stdout, speed
    and logs to stderr. Ctrl-C stops an answer, Ctrl-D exits.
    """
    from ..chat.runner import run

    run(build(ctx, ChatConfig))
