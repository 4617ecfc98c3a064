"""`vicuna train`: supervised fine-tuning, reward models, DPO and PPO, and the data inspector
(core: vicuna_cli/train/). Every option is a field of a config in train/config.py; the flags are
derived from it, so each method shows its own defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..train.config import NOT_PPO, DpoConfig, InspectConfig, PpoConfig, RewardConfig, TrainConfig
from ._common import build, derived, option_param

app = typer.Typer(help="Fine-tune chat models the Vicuna way (loss on the assistant's turns only).",
                  no_args_is_help=True)

NAMES: dict[str, Any] = {
    "model": ("-m", "--model"),
    "output": ("-o", "--output"),
    "template": ("--template", "-t"),
    "learning_rate": ("--learning-rate", "--lr"),
    "sample": ("--sample", "-s"),
    **{name: (f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",) for name in (
        "packing", "gradient_checkpointing", "lora", "qlora", "merge", "share_prompt", "precompute", "whiten_rewards")},
}
# How a run is launched, not what it does: not part of the run's config.
LAUNCH = [
    option_param("accelerate_config", Optional[Path], None,
                 "--accelerate-config", help="Run under `accelerate launch` with this config (recipes/accelerate/: ddp, fsdp, zero3)."),
    option_param("num_processes", Optional[int], None, "--num-processes", help="With --accelerate-config: processes (GPUs) to launch."),
]


def _train(ctx: typer.Context, config_class: type, run: Any) -> None:
    from ..core import console
    from ..train.launch import run_method

    result = run_method(lambda: build(ctx, config_class, exclude=("config", "accelerate_config", "num_processes")), run,
                        ctx.params.get("accelerate_config"), ctx.params.get("num_processes"))
    if result.files:  # the main process: it wrote the model
        loss = f" · final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
        accuracy = result.eval_metrics.get("eval_accuracy", result.eval_metrics.get("eval_rewards/accuracies"))
        loss += f" · eval pair accuracy {accuracy:.1%}" if accuracy is not None else ""
        console.err.print(f"[green]done[/green] {result.steps} steps in {result.seconds:.0f} s{loss}")
        console.out.print(str(result.run_dir), markup=False)


@app.command("sft")
@derived(TrainConfig, NAMES, extra=LAUNCH)
def sft(ctx: typer.Context, **options: Any) -> None:
    """Fine-tune MODEL on multi-turn conversations, loss on the assistant's turns (+ end-of-turn).

    Runs as is on one device, and under `accelerate launch` for DDP, FSDP or DeepSpeed ZeRO-3
    (configs in recipes/accelerate/). SIGTERM or Ctrl-C saves a checkpoint and stops; continue
    with --resume auto.
    """
    from ..train.sft import run_sft

    _train(ctx, TrainConfig, run_sft)


@app.command("rm")
@derived(RewardConfig, NAMES, extra=LAUNCH)
def rm(ctx: typer.Context, **options: Any) -> None:
    """Train a reward model from MODEL (the SFT model) on preference pairs: a scalar head at the last
    token of prompt + answer, Bradley–Terry loss -log σ(r_chosen − r_rejected − margin).

    Same loop, run dir, checkpoints, --resume, kernels, LoRA and accelerate launch as `train sft`
    (--max-length bounds each side). Eval reports pair accuracy, mean margin and accuracy per
    source. The run dir loads back with transformers' AutoModelForSequenceClassification
    (num_labels=1)."""
    from ..train.rm import run_rm

    _train(ctx, RewardConfig, run_rm)


@app.command("dpo")
@derived(DpoConfig, NAMES, extra=LAUNCH)
def dpo(ctx: typer.Context, **options: Any) -> None:
    """Align MODEL (the SFT model) to preference pairs with DPO: raise the log-probability of each
    chosen answer over the rejected one relative to a reference, -log σ(β·Δ) (or IPO, hinge).

    Log-probs are summed over the answer tokens only, chosen and rejected packed without padding.
    The reference's log-probs are computed once and stored in the run dir (reused by --resume).
    Same loop, run dir, checkpoints, --resume, kernels, LoRA (--merge) and accelerate launch as
    `train sft`; metrics.jsonl holds rewards/chosen, rewards/rejected, rewards/accuracies and
    rewards/margins. The run dir is the policy's model dir: `vicuna chat -m RUN_DIR`."""
    from ..train.dpo import run_dpo

    _train(ctx, DpoConfig, run_dpo)


@app.command("ppo")
@derived(PpoConfig, NAMES, skip=NOT_PPO, extra=LAUNCH)
def ppo(ctx: typer.Context, **options: Any) -> None:
    """RLHF with PPO: MODEL (the SFT model) answers --prompts, --reward-model scores the answers,
    and the policy learns from the score minus a KL penalty to the frozen reference.

    Rollouts come from vicuna's batch engine at the policy's current weights; a value head on the
    policy, GAE, clipped policy and value losses, --ppo-epochs passes per rollout batch, an
    adaptive KL coefficient. Same loop, run dir, checkpoints, --resume, LoRA (--merge) and
    accelerate launch as `train sft`; metrics.jsonl holds reward, kl, entropy, value_loss,
    clip_fraction, rollout and training tokens/s. The run dir is the policy's model dir:
    `vicuna chat -m RUN_DIR`."""
    from ..train.ppo import run_ppo

    _train(ctx, PpoConfig, run_ppo)


@app.command("inspect-data")
@derived(InspectConfig, NAMES, config_option=False)
def inspect_data(ctx: typer.Context, **options: Any) -> None:
    """Show one sample token by token with its label; supervised tokens are highlighted.

    This is how a label mask is checked: the assistant's words and each end-of-turn marker must
    be green, everything else (system, user turns, role tags) dim with label -100."""
    from rich.table import Table
    from rich.text import Text

    from ..core import console
    from ..train.inspect import inspect_sample

    config = build(ctx, InspectConfig)
    result = inspect_sample(config.model, config.data, config.sample, config.template, config.max_length,
                            trust_remote_code=config.trust_remote_code)
    table = Table(title=f"sample {result.sample_id} · template {result.template}", show_edge=False)
    for column in ("#", "id", "token", "text", "label"):
        table.add_column(column, justify="right" if column in ("#", "id", "label") else "left")
    for row in result.rows:
        style = "bold green" if row.label != -100 else "dim"
        table.add_row(str(row.index), str(row.token_id), Text(row.piece, style=style), Text(repr(row.text), style=style),
                      Text(str(row.label), style=style))
    console.out.print(table)
    console.out.print(f"{result.supervised} of {len(result.rows)} tokens supervised"
                      + (f" · {result.notes}" if result.notes else ""), markup=False)
