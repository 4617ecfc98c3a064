"""`vicuna apply-delta` and its aliases `make-delta` and `merge-lora`: weight deltas and LoRA
merges, streamed tensor by tensor (the work is in vicuna_cli/delta/)."""

from __future__ import annotations

from typing import Any

import typer

from ..delta.config import DeltaConfig
from ._common import derived

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


@derived(DeltaConfig, {"output": ("-o", "--output")})
def apply_delta(ctx: typer.Context, **options: Any) -> None:
    """TARGET = BASE + DELTA, DELTA = TARGET - BASE (--make) or a LoRA merge (--lora); help in APPLY_DELTA_HELP."""
    from ..core import console
    from ..core.config import build_config
    from ..delta import render, run
    from ._common import given_flags

    flags = {k: v for k, v in given_flags(ctx).items() if v is not None}
    if ctx.info_name == "make-delta":
        flags["make"] = True
    result = run(build_config(DeltaConfig, flags, ctx.params.get("config")))
    render(result)
    console.out.print(str(result.output), markup=False)
