"""The model side of training: load for training (precision, attention, LoRA/QLoRA, gradient
checkpointing, kernels), the per-method loss wrapped as a module, and the final save."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import console, models
from ..core.errors import VicunaError
from ..core.extras import require
from .config import TrainConfig
from .labels import IGNORE

LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class Setup:
    model: nn.Module  # the HF model (peft-wrapped with --lora)
    tokenizer: Any
    path: Path  # the resolved base model dir
    attention: str
    mixed_precision: str  # accelerate's name: "no", "bf16", "fp16"
    notes: list[str]  # what was chosen and why, for the log


def resolve_precision(precision: str, device: str) -> str:
    """bf16 mixed precision where the device computes bf16 natively (CUDA with bf16; a CPU with
    AVX512-BF16/AMX: the same rule as inference, core/placement.pick_dtype), else fp32; fp16 only
    on request. On such a CPU (AMD EPYC here) a PPO update's forward+backward took 4.6 s in bf16
    against 9.7 s in fp32 (its matmuls 7.7 -> 2.0 s); where bf16 is emulated it would be slower."""
    if precision == "auto":
        from ..core.placement import pick_dtype

        return "bf16" if pick_dtype(device, "auto") == "bfloat16" else "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[precision]


def training_device(config: TrainConfig) -> str:
    """"cuda" when asked for or available (and not refused by --device cpu), else "cpu"."""
    return "cpu" if config.device == "cpu" or not torch.cuda.is_available() else "cuda"


def pick_training_attention(requested: str, device: str, packing: bool) -> tuple[str, str]:
    if requested != "auto":
        if requested == "flash_attention_2":
            require("flash_attn", "gpu", "--attention flash_attention_2")
        return requested, "requested"
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "varlen kernels over packed rows" if packing else "CUDA with flash-attn"
    why = "block-diagonal causal mask from the reset position ids" if packing else "padded rows"
    return "sdpa", why + ("" if device != "cuda" else "; pip install 'vicuna-cli[gpu]' for flash-attn 2 varlen")


def load_for_training(config: TrainConfig, device: str, head: str = "causal") -> Setup:
    """`head` "reward": the model as *ForSequenceClassification with one label (a new scalar
    head on the causal LM's body), for `train rm`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    resolved = models.resolve(config.model)
    mixed = resolve_precision(config.precision, device)
    attention, why = pick_training_attention(config.attention, device, config.packing)
    notes = [f"attention {attention} ({why})", f"precision {mixed if mixed != 'no' else 'fp32'}"]
    kwargs: dict[str, Any] = {"attn_implementation": attention}
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 math); frozen LoRA bases
    # are stored in the compute dtype to save memory; QLoRA stores them in 4 bits.
    kwargs["dtype"] = torch.bfloat16 if config.lora and mixed == "bf16" else torch.float32
    if config.qlora:
        if device != "cuda":
            raise VicunaError("--qlora needs a CUDA GPU (bitsandbytes 4-bit)", hint="use --lora on this machine")
        require("bitsandbytes", "gpu", "--qlora")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if mixed == "bf16" else torch.float16)
    with models._quiet_transformers():
        try:
            tokenizer = models.load_pretrained(AutoTokenizer, resolved.path, trust_remote_code=config.trust_remote_code)
            model_class = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
            model = models.load_pretrained(model_class, resolved.path, trust_remote_code=config.trust_remote_code,
                                           **kwargs, **({"num_labels": 1} if head == "reward" else {}))
        except VicunaError:
            raise
        except Exception as exc:
            raise VicunaError(f"could not load {config.model} for training: {models._first_line(exc)}") from exc
    check_model_fits(model, tokenizer, config)
    model.config.use_cache = False
    if head == "reward" and tokenizer.pad_token_id is not None:
        # transformers reads a sequence's reward at its last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        notes.append("gradient checkpointing on")
    if config.lora:
        model = add_lora(model, config, "SEQ_CLS" if head == "reward" else "CAUSAL_LM")
        notes.append(f"LoRA r={config.lora_r} alpha={config.lora_alpha}" + (" on 4-bit weights (QLoRA)" if config.qlora else ""))
    return Setup(model, tokenizer, resolved.path, attention, mixed, notes)


def check_model_fits(model: Any, tokenizer: Any, config: TrainConfig) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise VicunaError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "token ids past the embedding would crash or train garbage",
            hint="use the tokenizer that came with this model (or resize the embeddings first)",
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.max_length > positions:
        raise VicunaError(
            f"--max-length {config.max_length} is beyond this model's {positions} positions",
            hint=f"use --max-length {positions} or less",
        )


def apply_kernels(model: nn.Module, mode: str) -> tuple[list[str], str]:
    """THE one place the kernels/ patches (Triton RMSNorm, SwiGLU, RoPE) go into the model: the
    ops applied and the reason (none on CPU). Called once the model sits on its device, since
    the kernels pick themselves by device. The fused linear cross-entropy is not a patch:
    `sft_loss` calls it directly."""
    import vicuna_kernels

    ops = vicuna_kernels.apply_kernels(model, mode)
    return ops, vicuna_kernels.kernel_plan(model, mode).describe()


def add_lora(model: nn.Module, config: TrainConfig, task: str = "CAUSAL_LM") -> nn.Module:
    peft = require("peft", "train", "--lora")
    if config.qlora:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    target: Any = config.lora_target[0] if config.lora_target == ["all-linear"] else config.lora_target
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=target, task_type=task)  # SEQ_CLS also trains the score head
    return peft.get_peft_model(model, lora)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sft_loss(fused: bool) -> LossFn:
    """Sum of token losses over the supervised targets of one micro-batch.

    Only the rows that carry a label go through the output head, and with `fused` (kernels on)
    the [tokens x vocab] logits are never materialised (`vicuna_kernels.linear_cross_entropy`)."""
    from vicuna_kernels import linear_cross_entropy

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        lm = causal_lm(model)
        targets = batch["targets"]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        keep = targets != IGNORE
        head = lm.get_output_embeddings()
        if _has_custom_head(lm, head):  # softcapped / scaled logits: let the model compute them
            return _cross_entropy_sum(model(**inputs, use_cache=False).logits[keep], targets[keep])
        # No attention mask on packed rows: transformers then reads sample boundaries from position_ids.
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state[keep]
        if fused:
            return linear_cross_entropy(hidden, head.weight, targets[keep])
        return _cross_entropy_sum(head(hidden), targets[keep])

    return loss


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax in at least fp32 (bf16 logits lose the loss's precision; fp64 stays fp64)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def decoder_inputs(model: nn.Module, batch: dict) -> dict:
    """The decoder's inputs from a batch; a boolean 4D mask (packing.shared_prefix_row) is made
    additive for eager attention, which adds the mask to the scores (SDPA takes it as it is)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool and model.config._attn_implementation == "eager":
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return inputs


def shares_prompt(config: TrainConfig) -> bool:
    """--share-prompt (pair methods) needs packed rows and an attention that takes a 4D mask:
    flash-attn's varlen kernels see only where sequences start (position ids), so with it each
    side of a pair stays a whole sequence. The same rule load_for_training picks the attention by."""
    return (getattr(config, "share_prompt", False) and config.packing
            and pick_training_attention(config.attention, training_device(config), True)[0] in ("sdpa", "eager"))


def _has_custom_head(lm: nn.Module, head: nn.Module) -> bool:
    config = lm.config
    return (getattr(head, "bias", None) is not None or not isinstance(head, nn.Linear)
            or bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", None) not in (None, 1.0))


class LossModule(nn.Module):
    """The model plus its loss, as one module: DDP/FSDP/DeepSpeed wrap this, so the output head's
    weight is gathered (FSDP) inside forward even when the loss uses it directly."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    @property
    def _no_split_modules(self) -> Any:  # accelerate's FSDP auto-wrap reads this
        return getattr(causal_lm(self.model), "_no_split_modules", None)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def save_final(accelerator: Any, module: nn.Module, tokenizer: Any, run_dir: Path, config: TrainConfig,
               base_path: Path, template: str) -> list[str]:
    """The trained model in HF format (safetensors + tokenizer) at the run dir's root, so
    `vicuna chat -m RUN_DIR` loads it; with --lora the adapter goes to RUN_DIR/adapter and
    --merge also writes the merged model at the root. Returns the files written."""
    # Sharded (FSDP/ZeRO-3) weights are gathered into one full state dict on the main process.
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return []
    inner = accelerator.unwrap_model(module).model
    # Only the model: a method's own trained modules (PPO's value head) stay in the checkpoints.
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")} if state else None
    target = run_dir / "adapter" if config.lora else run_dir
    with models._quiet_transformers():
        inner.save_pretrained(target, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(target)
    written = sorted(p.name for p in target.iterdir() if p.is_file())
    if config.lora and config.merge:
        written = merge_adapter(base_path, target, run_dir)
    if template != "auto":  # "auto" is the tokenizer's own chat template, saved with it
        for model_dir in {target, run_dir} if config.merge else {target}:
            models.record_template(model_dir, template)
        written = sorted({*written, models.TEMPLATE_RECORD})
    return written


def merge_adapter(base_path: Path, adapter: Path, run_dir: Path) -> list[str]:
    """Merge with the streaming `vicuna merge-lora` code, then move the model to the run dir root."""
    from ..delta.apply import DeltaConfig, run

    staging = run_dir / ".merged"
    shutil.rmtree(staging, ignore_errors=True)
    run(DeltaConfig(base=str(base_path), lora=str(adapter), output=staging, dtype="auto"))
    names = []
    for path in staging.iterdir():
        shutil.move(str(path), run_dir / path.name)
        names.append(path.name)
    staging.rmdir()
    return sorted(names)
