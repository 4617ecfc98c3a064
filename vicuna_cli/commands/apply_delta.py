"""`vicuna apply-delta` and its aliases `make-delta` and `merge-lora`: weight deltas and LoRA
merges, streamed tensor by tensor (the work is in vicuna_cli/delta/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

VOCAB_RULE = (
    "Embedding / LM-head rows beyond the base vocabulary (tokens the fine-tune added, like "
    "StableVicuna's PAD token) come from the delta as they are; any other shape mismatch is an "
    "error naming the tensor and both shapes."
)
STREAMING = (
    "Works tensor by tensor: memory stays near one tensor per input whatever the model size. "
    "Inputs are safetensors or .bin, sharded or not (.bin only through torch.load(weights_only=True)). "
    "The output is sharded safetensors with an index, config and tokenizer files, and "
    "vicuna-manifest.json with every file's sha256; it is built in a temporary directory and renamed "
    "into place when complete, so an interrupted run leaves nothing that looks like a model. "
    "Prints the output path on stdout."
)
APPLY_DELTA_HELP = (
    "Apply a weight delta: TARGET = BASE + DELTA (how Vicuna and StableVicuna were released).\n\n"
    "The sum is computed in fp32 and cast to --dtype; config and tokenizer come from the delta. "
    + VOCAB_RULE + "\n\n" + STREAMING
)
MAKE_DELTA_HELP = (
    "Make a weight delta: DELTA = TARGET - BASE (the same as apply-delta --make).\n\n"
    "The difference is computed in fp32 and cast to --dtype (auto: the target's). Added vocabulary "
    "rows are stored as the target's rows. The summary says whether applying the delta gives the "
    "target back bit for bit.\n\n" + STREAMING
)
MERGE_LORA_HELP = (
    "Merge a peft LoRA adapter into its base model (the same as apply-delta --lora).\n\n"
    "W += (B @ A) * alpha / r for each adapted module, in fp32. Tensors the adapter saves whole "
    "(modules_to_save, resized embeddings) replace the base ones; the tokenizer comes from the "
    "adapter if it has one. DoRA adapters are refused.\n\n" + STREAMING
)


def apply_delta(
    ctx: typer.Context,
    base: Optional[str] = typer.Option(None, "--base", help="Base model: model dir, alias or Hub id (e.g. the original LLaMA)."),
    delta: Optional[str] = typer.Option(None, "--delta", help="Delta to add to the base: model dir or Hub id."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Directory to write (the target; with --make, the delta)."),
    make: bool = typer.Option(False, "--make", help="Make a delta instead: --target minus --base, written to -o."),
    target: Optional[str] = typer.Option(None, "--target", help="With --make: the fine-tuned model."),
    lora: Optional[str] = typer.Option(None, "--lora", help="Merge this peft LoRA adapter (dir or Hub id) into --base instead."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16 (bf16), float16 (fp16) or float32 (fp32); arithmetic is always fp32. auto: the dtype in the delta's config (make: the target's; merge: the base's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."),
    check: Optional[str] = typer.Option(None, "--check", help="Before publishing, compare with this expected model (dir or name) or sha256 file (sha256sum format or a vicuna manifest); a mismatch lists the tensors and leaves nothing behind."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace -o if it exists (only once the new output is complete)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    """TARGET = BASE + DELTA, DELTA = TARGET - BASE (--make) or a LoRA merge (--lora); help in APPLY_DELTA_HELP."""
    from ..core import console
    from ..core.config import build_config
    from ..delta import DeltaConfig, render, run
    from ._common import given_flags

    flags = given_flags(ctx)
    if ctx.info_name == "make-delta":
        flags["make"] = True
    result = run(build_config(DeltaConfig, flags, config))
    render(result)
    console.out.print(str(result.output), markup=False)
