"""`vicuna data`: fetch, clean and describe conversation datasets (core: vicuna_cli/data/)."""

from __future__ import annotations

from typing import Any

import typer

from ..data.config import CleanConfig, FetchConfig, MixConfig, PairsConfig, StatsConfig
from ._common import build, derived, option_param

app = typer.Typer(help="Fetch, clean and describe conversation datasets.", no_args_is_help=True)

FORMATS_HELP = (
    "Input formats (detected from the first record): ShareGPT JSON/JSONL {id, conversations: [{from, value}]}; "
    "OpenAI messages JSONL {messages: [{role, content}]}; Alpaca {instruction, input, output}; "
    "GPT4All {prompt, response, source}; OASST1 message tables or tree exports (one conversation per path)."
)
NAMES: dict[str, Any] = {
    "inputs": {"argument": True, "show_default": False},
    "sources": {"argument": True, "show_default": False},
    "source": {"argument": True},
    "output": ("-o", "--output"),
    "model": ("-m", "--model"),
    "template": ("--template", "-t"),
    "workers": ("--workers", "-j"),
    **{name: (f"--{name}/--no-{name}",) for name in ("html", "empty", "roles", "dedup", "split", "languages")},
}


@app.command("fetch")
@derived(FetchConfig, NAMES, config_option=False)
def fetch(ctx: typer.Context, **options: Any) -> None:
    """Download a dataset file with progress and resume, verify it, and record it in a manifest.

    Prints the local path on stdout. Running it again after it completed does nothing.
    """
    from ..core import console
    from ..core.store import human_size
    from ..data.fetch import fetch as run

    config = build(ctx, FetchConfig)
    result = run(config.source, config.output, file=config.file, revision=config.revision, sha256=config.sha256,
                 retries=config.retries, force=config.force)
    if result.already:
        console.info(f"already fetched: {result.path} ({human_size(result.entry['size'])}, sha256 {result.entry['sha256'][:12]}…); nothing to do")
    else:
        console.err.print(f"[green]fetched[/green] {human_size(result.entry['size'])} · sha256 {result.entry['sha256']}")
    console.out.print(str(result.path), markup=False)


@app.command("clean", help=f"Clean conversations the Vicuna way into one ShareGPT file.\n\n{FORMATS_HELP}\n\n"
             "Steps in order (each counted in the report): html → empty → roles → length → blocklist → lang → "
             "dedup → split. The output appears only when complete (temp file + rename).")
@derived(CleanConfig, NAMES)
def clean(ctx: typer.Context, **options: Any) -> None:
    from ..core import console
    from ..data.pipeline import clean as run

    config = build(ctx, CleanConfig)
    result = run(config)
    result.print()
    console.info(f"wrote {result.records_out} conversations to {config.output} in {result.seconds:.1f} s")


@app.command("stats", help=f"Describe conversation files: records, turns, characters, token lengths (with -m), languages.\n\n{FORMATS_HELP}")
@derived(StatsConfig, NAMES, extra=[option_param("json_output", bool, False, "--json", help="Print the figures as JSON.")])
def stats(ctx: typer.Context, **options: Any) -> None:
    import json

    from ..core.console import out
    from ..data.report import print_stats
    from ..data.stats import stats as run

    figures = run(build(ctx, StatsConfig, exclude=("config", "json_output")))
    if options["json_output"]:
        out.print(json.dumps(figures, indent=2, ensure_ascii=False), markup=False)
    else:
        print_stats(figures, out)


@app.command("pairs")
@derived(PairsConfig, NAMES)
def pairs(ctx: typer.Context, **options: Any) -> None:
    """Turn preference datasets into one pairwise JSONL for `vicuna train rm`.

    HH-RLHF dialogues are split where chosen and rejected part; SHP pairs are ordered by `labels`
    and filtered by score ratio; OASST1 ranked assistant siblings give one pair per ranked couple.
    Steps (each counted): read → empty → identical → ratio → dedup. The output appears only when complete."""
    from ..core import console
    from ..data.preferences import pairs as run

    config = build(ctx, PairsConfig)
    result = run(config)
    result.print()
    console.info(f"wrote {result.records_out} pairs to {config.output} in {result.seconds:.1f} s")


@app.command("mix")
@derived(MixConfig, NAMES)
def mix(ctx: typer.Context, **options: Any) -> None:
    """Mix conversation (or preference) files in given shares into one file, deterministically.

    Each source is sampled without replacement until it runs out, then with replacement (reported);
    a record already taken from an earlier source is dropped from later ones (counted)."""
    from ..core import console
    from ..data.mix import mix as run, print_mix

    config = build(ctx, MixConfig)
    result = run(config)
    print_mix(result)
    console.info(f"wrote {sum(s.taken for s in result)} records to {config.output}")
