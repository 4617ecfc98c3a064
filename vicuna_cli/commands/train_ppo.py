"""`vicuna train ppo`: its options are `train sft`'s model, LoRA, precision and checkpoint options
plus PPO's own; every default lives in train/ppo.py's PpoConfig."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, get_type_hints

import typer

from .train import _train, app, sft

_NOT_PPO = ("data", "eval_split", "eval_data", "eval_every", "global_batch_size", "global_batch_tokens")
_RESTATED = {  # sft's help names sft's defaults; PPO's differ (see PpoConfig)
    "epochs": ("--epochs", "Passes over the prompts."),
    "learning_rate": ("--learning-rate", "--lr", "Learning rate of the policy and value head."),
    "lr_schedule": ("--lr-schedule", "constant, linear or cosine, after warmup."),
    "warmup_ratio": ("--warmup-ratio", "Warmup share of the steps."),
    "lora_dropout": ("--lora-dropout", "LoRA dropout (PPO default 0: dropout makes the policy ratio noisy)."),
}
_PPO = (
    ("prompts", Optional[List[str]], ("--prompts",), "Prompts: a conversation file (the turns before the last answer) or preference pairs (HH-RLHF, SHP, ...: the pair's prompt); repeat for more."),
    ("reward_model", Optional[str], ("--reward-model",), "Reward model dir (`vicuna train rm` output or any *ForSequenceClassification with one label)."),
    ("reward_device", Optional[str], ("--reward-device",), "Device of the reward model: auto, cpu or cuda."),
    ("rollout_batch_size", Optional[int], ("--rollout-batch-size",), "Prompts answered per step (one rollout batch)."),
    ("mini_batch_size", Optional[int], ("--mini-batch-size",), "Rollouts per optimizer update (default: the whole rollout batch)."),
    ("ppo_epochs", Optional[int], ("--ppo-epochs",), "Passes over each rollout batch."),
    ("max_new_tokens", Optional[int], ("--max-new-tokens",), "Most tokens per answer; prompts longer than --max-length minus this are skipped."),
    ("rollout_dtype", Optional[str], ("--rollout-dtype",), "Weights the rollouts sample from: auto (the policy's own, shared, no copy) or bfloat16 (bf16, fp16, fp32: a copy per step; bf16 decodes ~2x faster on CPU)."),
    ("kl_coef", Optional[float], ("--kl-coef",), "Initial weight of the per-token KL penalty to the reference."),
    ("target_kl", Optional[float], ("--target-kl",), "KL the adaptive controller steers towards (Ziegler et al.); 0 keeps --kl-coef fixed."),
    ("kl_horizon", Optional[int], ("--kl-horizon",), "Rollouts over which the adaptive KL coefficient moves."),
    ("gamma", Optional[float], ("--gamma",), "Discount of GAE."),
    ("lam", Optional[float], ("--lam",), "Lambda of GAE."),
    ("cliprange", Optional[float], ("--cliprange",), "Clip range of the policy ratio."),
    ("cliprange_value", Optional[float], ("--cliprange-value",), "Clip range of the value update."),
    ("vf_coef", Optional[float], ("--vf-coef",), "Weight of the value loss."),
    ("reward_clip", Optional[float], ("--reward-clip",), "Clip reward-model scores to +-this (0 = off)."),
    ("whiten_rewards", Optional[bool], ("--whiten-rewards/--no-whiten-rewards",), "Scores minus their running mean, over their running std."),
    ("log_samples", Optional[int], ("--log-samples",), "Write rollout samples (prompt, answer, reward) to RUN_DIR/samples.jsonl every N steps (0 = off)."),
)


def _ppo_signature() -> inspect.Signature:
    hints = get_type_hints(sft)
    params = {name: p.replace(annotation=hints[name]) for name, p in inspect.signature(sft).parameters.items()
              if name not in _NOT_PPO}
    for name, (*flags, help_text) in _RESTATED.items():
        params[name] = params[name].replace(default=typer.Option(None, *flags, help=help_text))
    for name, annotation, flags, help_text in _PPO:
        params[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                         default=typer.Option(None, *flags, help=help_text))
    return inspect.Signature(list(params.values()))


def ppo(ctx: typer.Context, **options: Any) -> None:
    """RLHF with PPO: MODEL (the SFT model) answers --prompts, --reward-model scores the answers,
    and the policy learns from the score minus a KL penalty to the frozen reference.

    Rollouts come from vicuna's batch engine at the policy's current weights; a value head on the
    policy, GAE, clipped policy and value losses, --ppo-epochs passes per rollout batch, an
    adaptive KL coefficient. Same loop, run dir, checkpoints, --resume, LoRA (--merge) and
    accelerate launch as `train sft`; metrics.jsonl holds reward, kl, entropy, value_loss,
    clip_fraction, rollout and training tokens/s. The run dir is the policy's model dir:
    `vicuna chat -m RUN_DIR`."""
    from ..train.ppo import PpoConfig, run_ppo

    _train(ctx, PpoConfig, run_ppo, options.get("config"), options.get("accelerate_config"), options.get("num_processes"))


ppo.__signature__ = _ppo_signature()  # type: ignore[attr-defined]
app.command("ppo")(ppo)
