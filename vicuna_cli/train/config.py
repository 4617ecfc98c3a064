"""The typed configs of `vicuna train sft|rm|dpo|ppo` and `train inspect-data` (defaults <
--config recipe.yaml < flags): every option's default, help and validation, declared once here;
the commands derive their flags from these classes. Kept free of torch so `--help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..core.choices import Dtype, TrainDevice
from ..core.config import CommandConfig
from ..core.hf import TRUST_REMOTE_CODE_HELP
from ..core.threads import Threads

# Vicuna's recipe (FastChat README): global batch 128, lr 2e-5, 3 epochs, max length 2048,
# weight decay 0, warmup 0.03, cosine schedule.
DEFAULT_GLOBAL_BATCH = 128

MODEL_HELP = "Base model: alias, model dir, .gguf or Hub id."
TEMPLATE_HELP = "Conversation template (default: the model's own, else vicuna_v1.1)."
PAIRS_HELP = "Preference pairs: `vicuna data pairs` output, HH-RLHF, SHP, OASST1 or {prompt, chosen, rejected}; repeat for more."


class TrainConfig(CommandConfig):
    model: str = Field("smollm2-135m-instruct", description=MODEL_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)
    data: list[str] = Field(default_factory=list, description="Conversation file (ShareGPT, OpenAI messages or Alpaca); repeat for more.")
    output: Path | None = Field(None, description="Run dir: config.yaml, metrics.jsonl, checkpoints/, the final model.")
    template: str | None = Field(None, description=TEMPLATE_HELP)  # None: the tokenizer's chat template, else vicuna_v1.1
    max_length: int = Field(2048, gt=1, description="Most tokens per sample.")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of the data held out for eval loss.")
    eval_data: list[str] = Field(default_factory=list, description="Eval conversation file(s) instead of --eval-split.")
    eval_every: int = Field(0, ge=0, description="Eval loss every N steps (and at the end); 0: only at the end.")
    epochs: int = Field(3, ge=1, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps (overrides --epochs).")
    seed: int = Field(42, description="Seed of data order and initialisation.")
    log_every: int = Field(10, ge=1, description="One log line every N steps.")

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="cosine, linear or constant, after warmup.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="Warmup share of the steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides --warmup-ratio).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 = off.")

    global_batch_size: int | None = Field(None, ge=1, description=f"Sequences per optimizer step over all processes (unset: {DEFAULT_GLOBAL_BATCH}).")
    global_batch_tokens: int | None = Field(None, ge=1, description="Or: tokens per optimizer step.")
    micro_batch_size: int = Field(1, ge=1, description="--no-packing: sequences per forward pass.")
    micro_batch_tokens: int | None = Field(None, ge=1, description="Packing: tokens per packed row (default --max-length).")
    packing: bool = Field(True, description="Pack samples without padding (default) or pad per micro-batch.")

    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    # bfloat16/float16 are mixed precision, float32 none
    precision: Dtype = Field("auto", description="auto (bf16 mixed precision where the device computes bf16 natively: GPUs with bf16, CPUs with AVX512-BF16/AMX; else fp32), bfloat16 (bf16), float16 (fp16) or float32 (fp32).")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto (flash-attn 2 on CUDA when installed, else sdpa), sdpa, eager, flash_attention_2.")
    kernels: Literal["auto", "off"] = Field("auto", description="auto: fused chunked loss and kernels/ patches; off: plain PyTorch.")
    device: TrainDevice = Field("auto", description="auto, cpu or cuda (gpu).")
    threads: Threads = None

    lora: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    lora_target: list[str] = Field(default_factory=lambda: ["all-linear"], description="Modules to adapt (default all-linear).")
    qlora: bool = Field(False, description="LoRA over 4-bit weights (CUDA + bitsandbytes).")
    merge: bool = Field(False, description="With --lora: also write the merged model to the run dir.")

    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = off).")
    save_every_minutes: float = Field(0.0, ge=0.0, description="Checkpoint every N minutes (0 = off).")
    keep_checkpoints: int = Field(3, ge=1, description="Complete checkpoints kept.")
    resume: str | None = Field(None, description="auto: continue from the newest complete checkpoint in -o; or a checkpoint dir.")
    overwrite: bool = Field(False, description="Replace a run already in -o.")
    report_to: list[str] = Field(default_factory=list, description="accelerate tracker: tensorboard, wandb, ... (repeatable).")
    run_name: str | None = Field(None, description="Tracker run name (default $SKYPILOT_TASK_ID or the run dir name).")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.global_batch_size is not None and self.global_batch_tokens is not None:
            raise ValueError("give --global-batch-size (sequences) or --global-batch-tokens, not both")
        if self.eval_split and self.eval_data:
            raise ValueError("give --eval-split or --eval-data, not both")
        if self.qlora:
            self.lora = True
        if self.merge and not self.lora:
            raise ValueError("--merge merges a LoRA adapter: it needs --lora")
        if self.global_batch_tokens is not None and self.global_batch_tokens < self.max_length:
            raise ValueError(
                f"--global-batch-tokens {self.global_batch_tokens} is smaller than --max-length {self.max_length}"
            )
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.max_length:
            raise ValueError(f"--micro-batch-tokens {self.micro_batch_tokens} is smaller than --max-length "
                             f"{self.max_length}: the longest sample must fit in one packed row")
        return self

    @property
    def row_capacity(self) -> int:
        return self.micro_batch_tokens or self.max_length

    def batch_size(self) -> int | None:
        """Sequences per step (None when the batch is counted in tokens)."""
        if self.global_batch_tokens is not None:
            return None
        return self.global_batch_size or DEFAULT_GLOBAL_BATCH


# What fixes which samples make up each optimizer step: a resumed run must not change these.
DATA_POSITION_FIELDS = (
    "model", "data", "template", "max_length", "eval_split", "eval_data", "seed",
    "global_batch_size", "global_batch_tokens", "packing", "micro_batch_tokens", "micro_batch_size",
    "share_prompt",  # train rm: a pair's packed length
)


class PairTrainConfig(TrainConfig):
    """`train sft`'s options for pairwise methods (`train rm`, `train dpo`): one epoch (InstructGPT,
    TRL, Zephyr), the batch counted in pairs, and SHP's ratio filter."""

    data: list[str] = Field(default_factory=list, description=PAIRS_HELP)
    eval_data: list[str] = Field(default_factory=list, description="Eval pair file(s) instead of --eval-split.")
    epochs: int = Field(1, ge=1, description="Passes over the data.")
    global_batch_size: int | None = Field(64, ge=1, description="Pairs per optimizer step over all processes.")
    shp_min_ratio: float = Field(2.0, ge=1.0, description="SHP inputs: least score ratio of a pair.")
    # packed rows hold a pair's common prompt once (SDPA or eager attention)
    share_prompt: bool = Field(True, description="Hold a pair's common prompt once in a packed row (SDPA).")

    @property
    def row_capacity(self) -> int:
        # --max-length bounds each sequence; a packed row must hold both sides of a pair.
        return self.micro_batch_tokens or 2 * self.max_length

    def batch_size(self) -> int | None:
        return None if self.global_batch_tokens is not None else self.global_batch_size


class RewardConfig(PairTrainConfig):
    """A reward model trains at a lower rate than SFT (InstructGPT, TRL)."""

    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")

    @model_validator(mode="after")
    def _no_merge(self) -> "RewardConfig":
        if self.merge:
            raise ValueError("--merge is not available for reward models yet: the LoRA adapter and its score head "
                             "are saved to RUN_DIR/adapter")
        return self


class DpoConfig(PairTrainConfig):
    """`train rm`'s pair options; a DPO run takes small steps from the SFT model (the DPO paper and
    Zephyr's alignment-handbook recipe: lr 5e-7, warmup 10 %)."""

    learning_rate: float = Field(5e-7, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Warmup share of the steps.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull to the reference (IPO: its tau); > 0.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="sigmoid (DPO), ipo or hinge.")
    sft_weight: float = Field(0.0, ge=0.0, description="RPO: add this weight x the chosen answer's mean token NLL.")
    ref_model: str | None = Field(None, description="Reference model (default: -m itself; with --lora the base with the adapter off).")
    precompute: bool = Field(True, description="Reference log-probs computed once before training and stored in the run dir, "
                                               "or a frozen reference kept in memory.")


# `train sft` options PPO has no use for: it reads --prompts and counts its batch in rollouts.
NOT_PPO = ("data", "eval_split", "eval_data", "eval_every", "global_batch_size", "global_batch_tokens")


class PpoConfig(TrainConfig):
    """`train sft`'s model, LoRA, precision, checkpoint and resume options, plus PPO's. Defaults
    follow trlX's PPO config (the StableVicuna trainer): constant lr 1e-5, 4 PPO epochs, clip 0.2,
    initial KL coefficient 0.05 adapted towards KL 6 over a 10,000-sample horizon, scores clipped
    to ±10, γ 1, λ 0.95."""

    position_fields: ClassVar[tuple[str, ...]] = (*DATA_POSITION_FIELDS, "prompts", "rollout_batch_size", "max_new_tokens")

    prompts: list[str] = Field(default_factory=list, description=(
        "Prompts: a conversation file (the turns before the last answer) or preference pairs (HH-RLHF, SHP, ...: "
        "the pair's prompt); repeat for more."))
    reward_model: Optional[str] = Field(None, description="Reward model dir (`vicuna train rm` output or any *ForSequenceClassification with one label).")
    reward_device: TrainDevice = Field("auto", description="Device of the reward model: auto, cpu or cuda.")
    epochs: int = Field(1, ge=1, description="Passes over the prompts.")
    learning_rate: float = Field(1e-5, gt=0, description="Learning rate of the policy and value head.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="constant, linear or cosine, after warmup.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warmup share of the steps.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (dropout makes the policy ratio noisy).")
    rollout_batch_size: int = Field(64, ge=1, description="Prompts answered per step (one rollout batch).")
    mini_batch_size: Optional[int] = Field(None, ge=1, description="Rollouts per optimizer update (default: the whole rollout batch).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    max_new_tokens: int = Field(128, ge=1, description="Most tokens per answer; prompts longer than --max-length minus this are skipped.")
    rollout_dtype: Dtype = Field("auto", description=(
        "Weights the rollouts sample from: auto (a bf16 copy per step where the device computes bf16 natively, "
        "~1.6x faster than fp32 on such a CPU; else the policy's own, shared), or bfloat16 (bf16), float16 (fp16), "
        "float32 (fp32): that dtype, a copy unless it is the policy's."))
    kl_coef: float = Field(0.05, ge=0.0, description="Initial weight of the per-token KL penalty to the reference.")
    target_kl: float = Field(6.0, ge=0.0, description="KL the adaptive controller steers towards (Ziegler et al.); 0 keeps --kl-coef fixed.")
    kl_horizon: int = Field(10000, ge=1, description="Rollouts over which the adaptive KL coefficient moves.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="Lambda of GAE.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value update.")
    vf_coef: float = Field(1.0, ge=0.0, description="Weight of the value loss.")
    reward_clip: float = Field(10.0, ge=0.0, description="Clip reward-model scores to +-this (0 = off).")
    whiten_rewards: bool = Field(False, description="Scores minus their running mean, over their running std.")
    log_samples: int = Field(10, ge=0, description="Write rollout samples (prompt, answer, reward) to RUN_DIR/samples.jsonl every N steps (0 = off).")

    @model_validator(mode="after")
    def _check_ppo(self) -> "PpoConfig":
        if self.data or self.eval_data or self.eval_split:
            raise ValueError("train ppo reads prompts from --prompts (no --data, --eval-data or --eval-split)")
        if self.global_batch_size is not None or self.global_batch_tokens is not None:
            raise ValueError("train ppo's batch is --rollout-batch-size prompts (and --mini-batch-size per update)")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in "
                             f"--max-length {self.max_length}")
        return self

    def batch_size(self) -> int | None:
        return self.rollout_batch_size


class InspectConfig(CommandConfig):
    """`vicuna train inspect-data`: one sample, token by token, with its label."""

    model: Optional[str] = Field(None, description=MODEL_HELP)
    data: list[str] = Field(min_length=1, description="Conversation file(s).")
    sample: str = Field("0", description="Sample id, or its index in the data.")
    template: Optional[str] = Field(None, description=TEMPLATE_HELP)
    max_length: int = Field(2048, gt=1, description="Most tokens per sample.")
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)


class ScoreConfig(CommandConfig):
    """`vicuna rm score`: a reward model over pairs, conversations or FastChat answers."""

    input: str = Field(description="A pairwise file (or HH-RLHF/SHP/OASST1), a conversation file, or a FastChat answer file.")
    model: str = Field(description="Reward model: a `train rm` run dir or a sequence classifier with one label.")
    # conversations and answers: the records with `reward` added
    output: Optional[Path] = Field(None, description="Write the records with their reward(s) here (needed for conversations and answers).")
    kind: Literal["auto", "pairs", "conversations", "answers"] = Field("auto", description="auto (detected), pairs, conversations or answers.")
    bench: Optional[str] = Field(None, description="FastChat answers: the questions (built-in name, question.jsonl or bench dir).")
    template: Optional[str] = Field(None, description="Template (default: the one the model was trained with).")
    batch_tokens: int = Field(4096, ge=16, description="Tokens per forward pass, sequences packed.")
    max_length: Optional[int] = Field(None, ge=2, description="Longest sequence scored (default: the model's positions); longer ones are counted, not cut.")
    device: TrainDevice = Field("auto", description="auto, cpu or cuda (gpu).")
    overwrite: bool = Field(False, description="Replace an existing output.")
