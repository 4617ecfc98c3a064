"""What a training method brings to the shared run (sft.run_training) and loop (loop.train): its
samples, how they become tensors, the unit its loss is normalised by, the loss itself, the model
head it trains, optional eval metrics beyond the eval loss, and an optional step between loading
the model and training (DPO computes its reference log-probs there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Method:
    name: str  # "sft", "rm": the command, in logs
    build: Callable[[Any, Any], tuple[list, list, Any, str]]  # (config, tokenizer) -> samples, eval, notes, template
    collate: Callable[[Sequence[Any], bool, int], dict]  # (samples, packing, pad id) -> tensors
    supervised: Callable[[Sequence[Any]], int]  # loss units of samples (tokens for SFT, pairs for RM)
    loss: Callable[[Any], Callable]  # config -> LossFn(model, batch) -> summed loss
    head: str = "causal"  # "causal": AutoModelForCausalLM; "reward": AutoModelForSequenceClassification(1)
    eval_metrics: Optional[Callable[[Any, Any, Any], dict]] = None  # (accelerator, module, spec) -> figures
    unit: str = "supervised tokens"
    # (config, setup, spec, accelerator, run_dir) -> samples, eval samples, LossFn; runs before the
    # model is wrapped for distribution
    prepare: Optional[Callable[[Any, Any, Any, Any, Any], tuple[list, list, Callable]]] = None
