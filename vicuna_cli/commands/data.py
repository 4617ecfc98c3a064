"""`vicuna data`: fetch, clean and describe conversation datasets (core: vicuna_cli/data/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from ..data.config import FetchConfig
from ._common import TRUST_REMOTE_CODE, build, derived

app = typer.Typer(help="Fetch, clean and describe conversation datasets.", no_args_is_help=True)

FORMATS_HELP = (
    "Input formats (detected from the first record): ShareGPT JSON/JSONL {id, conversations: [{from, value}]}; "
    "OpenAI messages JSONL {messages: [{role, content}]}; Alpaca {instruction, input, output}; "
    "GPT4All {prompt, response, source}; OASST1 message tables or tree exports (one conversation per path)."
)
_MODEL = typer.Option(None, "-m", "--model", help="Model whose tokenizer and template count tokens (alias, dir, .gguf or Hub id).")
_TEMPLATE = typer.Option(None, "--template", "-t", help="Conversation template (default: the model's own, else vicuna_v1.1).")
_INPUT_FORMAT = typer.Option("auto", "--input-format", help="auto, sharegpt, openai, alpaca, gpt4all or oasst1.")
_OASST_PATHS = typer.Option("best", "--oasst-paths", help="OASST1 trees: best (best-ranked reply at every turn) or all (every path).")
_WORKERS = typer.Option(0, "--workers", "-j", help="Worker processes; 0 = one per CPU. The output does not depend on it.")
_CONFIG = typer.Option(None, "--config", help="YAML file of options; flags override it.")


@app.command("fetch")
@derived(FetchConfig, {"source": {"argument": True}, "output": ("-o", "--output")}, config_option=False)
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
def clean(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Input files (- reads stdin).", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Output file: *.json (array) or *.jsonl."),
    format: Optional[str] = typer.Option(None, "--format", help="Output format json or jsonl (default: from -o's extension)."),
    input_format: str = _INPUT_FORMAT,
    oasst_paths: str = _OASST_PATHS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strict: bool = typer.Option(False, "--strict", help="Fail on a record of the wrong shape instead of skipping it."),
    html: bool = typer.Option(True, "--html/--no-html", help="Convert exported HTML to Markdown."),
    empty: bool = typer.Option(True, "--empty/--no-empty", help="Remove empty or whitespace-only turns."),
    roles: bool = typer.Option(True, "--roles/--no-roles", help="Normalise roles (merge, drop leading answer / trailing question)."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop repeated ids and repeated first exchanges."),
    split: bool = typer.Option(True, "--split/--no-split", help="With -m: split long conversations (else only count tokens)."),
    min_turns: int = typer.Option(1, "--min-turns", help="Drop conversations with fewer assistant turns."),
    min_chars: int = typer.Option(16, "--min-chars", help="Drop conversations with fewer characters."),
    blocklist: Optional[List[Path]] = typer.Option(None, "--blocklist", help="File of phrases (one a line); conversations containing one are dropped."),
    blocklist_preset: Optional[str] = typer.Option(None, "--blocklist-preset", help="'original': the list Vicuna's cleaning used (openai, chatgpt, rate-limit answers)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Keep only these languages, e.g. en,ko (ISO 639-1)."),
    model: Optional[str] = _MODEL,
    template: Optional[str] = _TEMPLATE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    max_length: int = typer.Option(2048, "--max-length", help="With -m: most tokens per piece."),
    workers: int = _WORKERS,
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON here."),
    config: Optional[Path] = _CONFIG,
) -> None:
    from ..core import console
    from ..core.config import build_config
    from ..data.pipeline import CleanConfig, clean as run
    from ._common import given_flags

    flags = given_flags(ctx)
    if not flags.get("blocklist"):
        flags.pop("blocklist", None)
    result = run(build_config(CleanConfig, flags, config))
    result.print()
    console.info(f"wrote {result.records_out} conversations to {output} in {result.seconds:.1f} s")


@app.command("stats", help=f"Describe conversation files: records, turns, characters, token lengths (with -m), languages.\n\n{FORMATS_HELP}")
def stats(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Input files (- reads stdin).", show_default=False),
    input_format: str = _INPUT_FORMAT,
    model: Optional[str] = _MODEL,
    template: Optional[str] = _TEMPLATE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    languages: bool = typer.Option(True, "--languages/--no-languages", help="Identify each conversation's language."),
    workers: int = _WORKERS,
    json_output: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    config: Optional[Path] = _CONFIG,
) -> None:
    import json

    from ..core.config import build_config
    from ..core.console import out
    from ..data.report import print_stats
    from ..data.stats import StatsConfig, stats as run
    from ._common import given_flags

    figures = run(build_config(StatsConfig, given_flags(ctx, exclude=("config", "json_output")), config))
    if json_output:
        out.print(json.dumps(figures, indent=2, ensure_ascii=False), markup=False)
    else:
        print_stats(figures, out)


@app.command("pairs")
def pairs(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Preference files (- reads stdin).", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Output: pairwise JSONL {id, prompt, chosen, rejected, source, margin?}."),
    input_format: str = typer.Option("auto", "--input-format", help="auto, hh-rlhf, shp, oasst1 or pairs."),
    shp_min_ratio: Optional[float] = typer.Option(None, "--shp-min-ratio", help="SHP: keep pairs whose preferred answer's score is at least this multiple of the other's (default 2, as in the SHP paper)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strict: bool = typer.Option(False, "--strict", help="Fail on a record of the wrong shape instead of skipping it."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop pairs with the same prompt and answers."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON here."),
    config: Optional[Path] = _CONFIG,
) -> None:
    """Turn preference datasets into one pairwise JSONL for `vicuna train rm`.

    HH-RLHF dialogues are split where chosen and rejected part; SHP pairs are ordered by `labels`
    and filtered by score ratio; OASST1 ranked assistant siblings give one pair per ranked couple.
    Steps (each counted): read → empty → identical → ratio → dedup. The output appears only when complete."""
    from ..core import console
    from ..core.config import build_config
    from ..data.preferences import PairsConfig, pairs as run
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx).items() if v is not None}
    result = run(build_config(PairsConfig, flags, config))
    result.print()
    console.info(f"wrote {result.records_out} pairs to {output} in {result.seconds:.1f} s")


@app.command("mix")
def mix(
    ctx: typer.Context,
    sources: List[str] = typer.Argument(..., help="PATH:SHARE (e.g. oasst.json:0.5) or PATH:RECORDS (e.g. alpaca.json:1000).", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="Output file: *.json or *.jsonl."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sampling and the output order (default 42)."),
    total: Optional[int] = typer.Option(None, "--total", help="Records in the mix, with shares (default: all distinct records of the sources)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="auto (from the first source), conversations or pairs."),
    format: Optional[str] = typer.Option(None, "--format", help="Output format json or jsonl (default: from -o's extension)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the per-source figures as JSON here."),
    config: Optional[Path] = _CONFIG,
) -> None:
    """Mix conversation (or preference) files in given shares into one file, deterministically.

    Each source is sampled without replacement until it runs out, then with replacement (reported);
    a record already taken from an earlier source is dropped from later ones (counted)."""
    from ..core import console
    from ..core.config import build_config
    from ..data.mix import MixConfig, mix as run, print_mix
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx).items() if v is not None}
    result = run(build_config(MixConfig, flags, config))
    print_mix(result)
    console.info(f"wrote {sum(s.taken for s in result)} records to {output}")
