"""`vicuna train`: supervised fine-tuning and its data inspector (core: vicuna_cli/train/)."""

from __future__ import annotations

from pathlib import Path
import inspect
from typing import Any, List, Optional, get_type_hints

import typer

from ._common import THREADS, TRUST_REMOTE_CODE

app = typer.Typer(help="Fine-tune chat models the Vicuna way (loss on the assistant's turns only).",
                  no_args_is_help=True)

_DATA = typer.Option(None, "--data", help="Conversation file (ShareGPT, OpenAI messages or Alpaca); repeat for more.")
_MODEL = typer.Option(None, "-m", "--model", help="Base model: alias, model dir, .gguf or Hub id.")
_TEMPLATE = typer.Option(None, "--template", "-t", help="Conversation template (default: the model's own, else vicuna_v1.1).")
_MAX_LENGTH = typer.Option(None, "--max-length", help="Most tokens per sample (default 2048).")


@app.command("sft")
def sft(
    ctx: typer.Context,
    model: Optional[str] = _MODEL,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    data: Optional[List[str]] = _DATA,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Run dir: config.yaml, metrics.jsonl, checkpoints/, the final model."),
    template: Optional[str] = _TEMPLATE,
    max_length: Optional[int] = _MAX_LENGTH,
    eval_split: Optional[float] = typer.Option(None, "--eval-split", help="Fraction of the data held out for eval loss."),
    eval_data: Optional[List[str]] = typer.Option(None, "--eval-data", help="Eval conversation file(s) instead of --eval-split."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Eval loss every N steps (and at the end)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the data (default 3)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (overrides --epochs)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order and initialisation (default 42)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="One log line every N steps (default 10)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate (default 2e-5)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="cosine (default), linear or constant, after warmup."),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Warmup share of the steps (default 0.03)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Warmup steps (overrides --warmup-ratio)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm; 0 = off (default 1)."),
    global_batch_size: Optional[int] = typer.Option(None, "--global-batch-size", help="Sequences per optimizer step over all processes (default 128)."),
    global_batch_tokens: Optional[int] = typer.Option(None, "--global-batch-tokens", help="Or: tokens per optimizer step."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="--no-packing: sequences per forward pass (default 1)."),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", help="Packing: tokens per packed row (default --max-length)."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Pack samples without padding (default) or pad per micro-batch."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward to save memory."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 where the GPU has it, else fp32), bfloat16 (bf16), float16 (fp16) or float32 (fp32)."),
    attention: Optional[str] = typer.Option(None, "--attention", help="auto (flash-attn 2 on CUDA when installed, else sdpa), sdpa, eager, flash_attention_2."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="auto: fused chunked loss and kernels/ patches; off: plain PyTorch."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = THREADS,
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="Train a LoRA adapter (peft) instead of all weights."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (default 16)."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 32)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (default 0.05)."),
    lora_target: Optional[List[str]] = typer.Option(None, "--lora-target", help="Modules to adapt (default all-linear)."),
    qlora: Optional[bool] = typer.Option(None, "--qlora/--no-qlora", help="LoRA over 4-bit weights (CUDA + bitsandbytes)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="With --lora: also write the merged model to the run dir."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0 = off)."),
    save_every_minutes: Optional[float] = typer.Option(None, "--save-every-minutes", help="Checkpoint every N minutes (0 = off)."),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Complete checkpoints kept (default 3)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue from the newest complete checkpoint in -o; or a checkpoint dir."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a run already in -o."),
    report_to: Optional[List[str]] = typer.Option(None, "--report-to", help="accelerate tracker: tensorboard, wandb, ... (repeatable)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Tracker run name (default $SKYPILOT_TASK_ID or the run dir name)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML recipe of options; flags override it."),
    accelerate_config: Optional[Path] = typer.Option(None, "--accelerate-config", help="Run under `accelerate launch` with this config (recipes/accelerate/: ddp, fsdp, zero3)."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="With --accelerate-config: processes (GPUs) to launch."),
) -> None:
    """Fine-tune MODEL on multi-turn conversations, loss on the assistant's turns (+ end-of-turn).

    Runs as is on one device, and under `accelerate launch` for DDP, FSDP or DeepSpeed ZeRO-3
    (configs in recipes/accelerate/). SIGTERM or Ctrl-C saves a checkpoint and stops; continue
    with --resume auto.
    """
    from ..train.config import TrainConfig
    from ..train.sft import run_sft

    _train(ctx, TrainConfig, run_sft, config, accelerate_config, num_processes)


def _train(ctx: typer.Context, config_class: type, run: Any, config: Optional[Path], accelerate_config: Optional[Path],
           num_processes: Optional[int]) -> None:
    from ..core import console
    from ..core.config import build_config
    from ..core.errors import VicunaError
    from ..train.launch import launched, relaunch
    from ..train.loop import Stop
    from ._common import given_flags

    if accelerate_config is not None and not launched():
        relaunch(accelerate_config, num_processes)
    flags = {k: v for k, v in given_flags(ctx, exclude=("config", "accelerate_config", "num_processes")).items()
             if v is not None}
    cfg = build_config(config_class, flags, config)
    try:
        result = run(cfg)
    except Stop as stop:
        raise VicunaError(f"stopped by {stop.signame} after step {stop.step}; checkpoint saved to {stop.path}",
                          hint="continue with the same command plus --resume auto",
                          exit_code=130 if stop.signame == "SIGINT" else 143) from None
    if result.files:  # the main process: it wrote the model
        loss = f" · final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
        accuracy = result.eval_metrics.get("eval_accuracy", result.eval_metrics.get("eval_rewards/accuracies"))
        loss += f" · eval pair accuracy {accuracy:.1%}" if accuracy is not None else ""
        console.err.print(f"[green]done[/green] {result.steps} steps in {result.seconds:.0f} s{loss}")
        console.out.print(str(result.run_dir), markup=False)


def _rm_signature() -> inspect.Signature:
    """`train sft`'s options, with --data naming pair files and SHP's ratio filter added."""
    hints = get_type_hints(sft)  # the annotations are strings here (postponed evaluation)
    params = {name: p.replace(annotation=hints[name]) for name, p in inspect.signature(sft).parameters.items()}
    params["data"] = params["data"].replace(default=typer.Option(
        None, "--data", help="Preference pairs: `vicuna data pairs` output, HH-RLHF, SHP, OASST1 or {prompt, chosen, rejected}; repeat for more."))
    params["eval_data"] = params["eval_data"].replace(default=typer.Option(None, "--eval-data", help="Eval pair file(s) instead of --eval-split."))
    params["shp_min_ratio"] = inspect.Parameter("shp_min_ratio", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float],
                                                default=typer.Option(None, "--shp-min-ratio", help="SHP inputs: least score ratio of a pair (default 2)."))
    params["share_prompt"] = inspect.Parameter("share_prompt", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                               default=typer.Option(None, "--share-prompt/--no-share-prompt",
                                                                    help="Hold a pair's common prompt once in a packed row (SDPA; default on)."))
    # Pair methods have their own defaults (in the command's docstring): not SFT's in these helps.
    for name, flags, text in (("epochs", ("--epochs",), "Passes over the data."),
                              ("learning_rate", ("--learning-rate", "--lr"), "Peak learning rate."),
                              ("warmup_ratio", ("--warmup-ratio",), "Warmup share of the steps."),
                              ("global_batch_size", ("--global-batch-size",), "Pairs per optimizer step over all processes.")):
        params[name] = params[name].replace(default=typer.Option(None, *flags, help=text))
    return inspect.Signature(list(params.values()))


def rm(ctx: typer.Context, **options: Any) -> None:
    """Train a reward model from MODEL (the SFT model) on preference pairs: a scalar head at the last
    token of prompt + answer, Bradley–Terry loss -log σ(r_chosen − r_rejected − margin).

    Same loop, run dir, checkpoints, --resume, kernels, LoRA and accelerate launch as `train sft`
    (defaults here: 1 epoch, lr 1e-5, 64 pairs per step; --max-length bounds each side). Eval
    reports pair accuracy, mean margin and accuracy per source. The run dir loads back with
    transformers' AutoModelForSequenceClassification (num_labels=1)."""
    from ..train.rm import RewardConfig, run_rm

    _train(ctx, RewardConfig, run_rm, options.get("config"), options.get("accelerate_config"), options.get("num_processes"))


rm.__signature__ = _rm_signature()  # type: ignore[attr-defined]
app.command("rm")(rm)


def _dpo_signature() -> inspect.Signature:
    """`train rm`'s options (pair data, SHP ratio) plus DPO's own."""
    params = dict(_rm_signature().parameters)

    def option(name: str, annotation: Any, *flags: str, help: str) -> None:
        params[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                         default=typer.Option(None, *flags, help=help))

    option("beta", Optional[float], "--beta", help="Strength of the pull to the reference (IPO: its tau); > 0.")
    option("loss", Optional[str], "--loss", help="sigmoid (DPO, default), ipo or hinge.")
    option("sft_weight", Optional[float], "--sft-weight", help="RPO: add this weight x the chosen answer's mean token NLL.")
    option("ref_model", Optional[str], "--ref-model", help="Reference model (default: -m itself; with --lora the base with the adapter off).")
    option("precompute", Optional[bool], "--precompute/--no-precompute",
           help="Reference log-probs computed once before training and stored in the run dir, or a frozen reference kept in memory.")
    return inspect.Signature(list(params.values()))


def dpo(ctx: typer.Context, **options: Any) -> None:
    """Align MODEL (the SFT model) to preference pairs with DPO: raise the log-probability of each
    chosen answer over the rejected one relative to a reference, -log σ(β·Δ) (or IPO, hinge).

    Log-probs are summed over the answer tokens only, chosen and rejected packed without padding.
    The reference's log-probs are computed once and stored in the run dir (reused by --resume).
    Same loop, run dir, checkpoints, --resume, kernels, LoRA (--merge) and accelerate launch as
    `train sft` (defaults here: 1 epoch, lr 5e-7, warmup 10 %, 64 pairs per step); metrics.jsonl holds
    rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins. The run dir is the
    policy's model dir: `vicuna chat -m RUN_DIR`."""
    from ..train.dpo import DpoConfig, run_dpo

    _train(ctx, DpoConfig, run_dpo, options.get("config"), options.get("accelerate_config"), options.get("num_processes"))


dpo.__signature__ = _dpo_signature()  # type: ignore[attr-defined]
app.command("dpo")(dpo)


@app.command("inspect-data")
def inspect_data(
    model: Optional[str] = _MODEL,
    data: List[str] = typer.Option(..., "--data", help="Conversation file(s)."),
    sample: str = typer.Option("0", "--sample", "-s", help="Sample id, or its index in the data."),
    template: Optional[str] = _TEMPLATE,
    max_length: int = typer.Option(2048, "--max-length", help="Most tokens per sample."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Show one sample token by token with its label; supervised tokens are highlighted.

    This is how a label mask is checked: the assistant's words and each end-of-turn marker must
    be green, everything else (system, user turns, role tags) dim with label -100."""
    from rich.table import Table
    from rich.text import Text

    from ..core import console
    from ..train.inspect import inspect_sample

    result = inspect_sample(model, data, sample, template, max_length, trust_remote_code=trust_remote_code)
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
from . import train_ppo  # noqa: E402,F401  (registers `train ppo` on this app)
