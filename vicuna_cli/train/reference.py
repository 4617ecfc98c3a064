"""DPO's reference model: which model it is, and its log-probs computed once before training.

The reference is `--ref-model`, else the SFT model itself (-m); with `--lora` and no
`--ref-model` it is the policy with its adapter disabled, so no second copy is ever loaded.

By default every pair's reference log-probs (chosen, rejected) are computed before the first step
(every process scores its share, the sums are reduced) and written atomically to
RUN_DIR/dpo_reference/logps.safetensors with a fingerprint of what determines them: the reference
model's files, the precision and attention it runs with, and every sample's tokens and answer
mask. A resumed run (or a rerun into the same dir) whose fingerprint matches reads them back; any
change recomputes them. Only the policy stays in memory during training. With `--no-precompute`
the reference stays loaded (a frozen copy, or the adapter switched off) and runs beside the policy
on every micro-batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..core import console, models
from ..core.errors import VicunaError

# Not at the run dir root: a *.safetensors there would be read as part of the model by the loaders.
REFERENCE_FILE = "dpo_reference/logps.safetensors"
_SAMPLED = 1 << 20  # bytes hashed at each end of a weight file: enough to tell files apart, fast for 26 GB


def prepare(config: Any, setup: Any, spec: Any, accelerator: Any, run_dir: Path) -> tuple[list, list, Callable]:
    """The method hook of sft.run_training: the samples with their reference log-probs (or the
    frozen reference) and the loss function."""
    from .dpo import dpo_loss

    if accelerator.is_main_process and any(s.shared for s in spec.samples):
        console.info(f"rows: each pair's prompt once, both answers attending to it ({setup.attention}, 4D mask)")
    reference, ref_model, ref_path = reference_for(config, setup, accelerator)
    if not config.precompute:
        if accelerator.is_main_process:
            console.info(f"reference: {_describe(config, ref_path)}, kept in memory (--no-precompute)")
        return spec.samples, spec.eval_samples, dpo_loss(config, reference)
    fingerprint = reference_fingerprint(ref_path, setup, config, [*spec.samples, *spec.eval_samples])
    path = run_dir / REFERENCE_FILE
    stored = load_stored(path, fingerprint, len(spec.samples), len(spec.eval_samples))
    if stored is not None:
        train, held = stored
        if accelerator.is_main_process:
            console.info(f"reference log-probs: reused from {path} (same model and data)")
    else:
        if accelerator.is_main_process:
            if path.is_file():
                console.warn(f"{path} was computed for another model or data: computing it again")
            console.info(f"reference log-probs: computing them once for {len(spec.samples) + len(spec.eval_samples)} "
                         f"pairs ({_describe(config, ref_path)})")
        train = compute(accelerator, reference, setup.model, spec, spec.samples, spec.lengths)
        held = compute(accelerator, reference, setup.model, spec, spec.eval_samples, spec.eval_lengths)
        if accelerator.is_main_process:
            store(path, fingerprint, train, held)
        accelerator.wait_for_everyone()
    del ref_model  # only the policy stays in memory
    return _with_ref(spec.samples, train), _with_ref(spec.eval_samples, held), dpo_loss(config)


def _describe(config: Any, ref_path: Path) -> str:
    if config.ref_model:
        return f"--ref-model {config.ref_model}"
    return "the base model with the LoRA adapter disabled" if config.lora else f"the SFT model {config.model}"


def reference_for(config: Any, setup: Any, accelerator: Any) -> tuple[Callable, Any, Path]:
    """(reference log-prob function of (policy, batch), the reference model if one is held, its dir)."""
    from .dpo import sequence_logps

    if config.ref_model:
        ref_model, ref_path = load_reference(config, setup)
    elif config.precompute and not config.lora:  # the policy before its first step is the reference
        return sequence_logps, None, setup.path
    elif config.lora:
        def adapter_off(policy: Any, batch: dict) -> torch.Tensor:
            peft_model = _peft(policy)
            with peft_model.disable_adapter():
                return sequence_logps(peft_model, batch)

        return adapter_off, None, setup.path
    else:
        ref_model, ref_path = copy.deepcopy(setup.model), setup.path
    ref_model.requires_grad_(False).eval().to(accelerator.device)

    def frozen(policy: Any, batch: dict) -> torch.Tensor:
        return sequence_logps(ref_model, batch)

    return frozen, ref_model, ref_path


def _peft(model: Any) -> Any:
    return model.module if hasattr(model, "module") and not hasattr(model, "disable_adapter") else model


def load_reference(config: Any, setup: Any) -> tuple[Any, Path]:
    """`--ref-model`, loaded like the policy; it must share the policy's tokenizer, since DPO
    compares the two models' log-probs of the very same token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import check_model_fits

    resolved = models.resolve(config.ref_model)
    dtype = next(p.dtype for p in setup.model.parameters() if p.is_floating_point())
    with models._quiet_transformers():
        try:
            tokenizer = models.load_pretrained(AutoTokenizer, resolved.path, trust_remote_code=config.trust_remote_code)
            model = models.load_pretrained(AutoModelForCausalLM, resolved.path, trust_remote_code=config.trust_remote_code,
                                           dtype=dtype, attn_implementation=setup.attention)
        except VicunaError:
            raise
        except Exception as exc:
            raise VicunaError(f"could not load --ref-model {config.ref_model}: {models._first_line(exc)}") from exc
    if tokenizer.get_vocab() != setup.tokenizer.get_vocab():
        raise VicunaError(f"--ref-model {config.ref_model} has another tokenizer than {config.model}: DPO compares "
                          "both models' log-probs of the same token ids",
                          hint="use a reference with the policy's tokenizer (usually the SFT model it came from)")
    check_model_fits(model, setup.tokenizer, config)
    return model, resolved.path


def model_fingerprint(path: Path) -> list[Any]:
    """Names, sizes and the first and last MiB of a model's weight and config files: a changed or
    other model shows, without reading every byte of a 26 GB checkpoint."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in
                                                 (".safetensors", ".bin", ".gguf", ".json", ".pt", ".model"))
    found = []
    for file in files:
        size = file.stat().st_size
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            digest.update(f.read(_SAMPLED))
            if size > 2 * _SAMPLED:
                f.seek(size - _SAMPLED)
                digest.update(f.read(_SAMPLED))
        found.append([file.name, size, digest.hexdigest()])
    return found


def reference_fingerprint(ref_path: Path, setup: Any, config: Any, samples: list) -> str:
    digest = hashlib.sha256()
    dtype = str(next(p.dtype for p in setup.model.parameters() if p.is_floating_point()))
    digest.update(json.dumps([model_fingerprint(Path(ref_path)), setup.mixed_precision, setup.attention, dtype,
                              bool(config.lora and not config.ref_model)]).encode())
    for sample in samples:
        for ids, labels in sample.sides():
            digest.update(json.dumps([ids, labels]).encode())
    return digest.hexdigest()


def load_stored(path: Path, fingerprint: str, n_train: int, n_eval: int) -> tuple[list, list] | None:
    """The stored log-probs when they were computed for this fingerprint (safetensors: plain
    tensors, nothing that could run code)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            train, held = f.get_tensor("train"), f.get_tensor("eval")
    except Exception as exc:
        console.warn(f"{path} does not load ({models._first_line(exc)}): computing it again")
        return None
    if train.shape != (n_train, 2) or held.shape != (n_eval, 2):
        return None
    return train.tolist(), held.tolist()


def store(path: Path, fingerprint: str, train: list, held: list) -> None:
    from safetensors.torch import save

    from ..core.store import AtomicFile

    tensors = {"train": torch.tensor(train, dtype=torch.float64).reshape(-1, 2),
               "eval": torch.tensor(held, dtype=torch.float64).reshape(-1, 2)}
    data = save(tensors, metadata={"fingerprint": fingerprint})
    with AtomicFile(path, "wb") as f:
        f.write(data)


@torch.no_grad()
def compute(accelerator: Any, reference: Callable, policy: Any, spec: Any, samples: list, lengths: list[int]) -> list:
    """Reference log-probs [(chosen, rejected)] of `samples`: each process scores its share of the
    micro-batches the loop would make, and the zero-filled results are summed over processes."""
    from .packing import split_step

    world, rank = accelerator.num_processes, accelerator.process_index
    policy.to(accelerator.device)
    was_training = policy.training
    policy.eval()
    out = torch.zeros(len(samples), 2, dtype=torch.float64, device=accelerator.device)
    for group in split_step(list(range(len(samples))), lengths, world, rank, spec.config.packing, spec.config.row_capacity,
                            spec.config.micro_batch_size):
        if not group:
            continue
        batch = {k: v.to(accelerator.device) for k, v in spec.collate([samples[i] for i in group]).items()}
        with accelerator.autocast():
            logps = reference(policy, batch).double().view(-1, 2)
        out[torch.tensor(group, device=out.device)] = logps
    policy.train(was_training)
    out = accelerator.reduce(out, "sum") if world > 1 else out
    return out.cpu().tolist()


def _with_ref(samples: list, values: list) -> list:
    from dataclasses import replace

    return [replace(sample, ref=(float(c), float(r))) for sample, (c, r) in zip(samples, values)]
