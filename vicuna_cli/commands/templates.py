"""`vicuna templates`: list the conversation templates, or render one on an example."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ._common import TRUST_REMOTE_CODE

app = typer.Typer(help="List conversation templates, or show how one renders.", invoke_without_command=True)


@app.callback()
def list_templates(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the templates (name, description, stop strings)."""
    if ctx.invoked_subcommand:
        return
    from rich.markup import escape
    from rich.table import Table

    from ..core.console import out
    from ..core.templates import get_template, template_names

    rows = []
    for name in template_names():
        if name == "auto":
            rows.append({"name": name, "description": "the model tokenizer's own chat template (ChatML, Llama-3, ...)", "stop": []})
        else:
            t = get_template(name)
            rows.append({"name": name, "description": t.description, "stop": list(t.stop)})
    if as_json:
        out.print(json.dumps(rows, indent=2), markup=False)
        return
    table = Table("template", "description", "stop strings")
    for row in rows:
        table.add_row(row["name"], escape(row["description"]), escape(", ".join(repr(s) for s in row["stop"])))
    out.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Template name (see `vicuna templates`)."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Model whose tokenizer renders `auto`."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to render with."),
    raw: bool = typer.Option(False, "--repr", help="Print the exact string as a Python repr."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Render an example conversation with template NAME (exact text on stdout)."""
    from ..core.console import out
    from ..core.templates import EXAMPLE_CONVERSATION, get_template

    tokenizer = None
    if name == "auto":
        tokenizer = _tokenizer(model, trust_remote_code)
    template = get_template(name, tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + EXAMPLE_CONVERSATION
    text = template.render(messages).text
    out.print(repr(text) if raw else text, markup=False)


def _tokenizer(model: Optional[str], trust_remote_code: bool):
    from transformers import AutoTokenizer

    from ..core import models
    from ..core.errors import VicunaError, first_line
    from ..core.hf import load_pretrained, quiet_transformers

    path = models.resolve(model).path
    with quiet_transformers():
        try:
            return load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        except VicunaError:
            raise
        except Exception as exc:  # transformers raises many types for a tokenizer it cannot read
            raise VicunaError(f"could not load the tokenizer of {path}: {first_line(exc)}") from exc
