"""THE training loop, over accelerate (one process, DDP, FSDP or DeepSpeed alike).

Method-specific parts come in as arguments: the samples, the collate function and the loss module
(`LossModule(model, loss_fn)`), so SFT, reward modelling or DPO share this loop.

Loss normalisation (../shared/specs/masking.md): an optimizer step's loss is the sum of its token
losses divided by the number of supervised tokens of the WHOLE global batch, across micro-batches,
accumulation and ranks. Every rank knows that number before the step (the plan is the same
everywhere), so each micro-batch backpropagates sum * world_size / n (DDP and FSDP average the
gradients over ranks), and packing, micro-batch size, accumulation or world size do not reweight
samples.

A method's loss may return `(loss_sum, figures)`: figures are sums over its loss units (DPO's
rewards per pair, say), reduced like the loss and logged per step as means (eval: `eval_` + name).

A step whose loss is NaN or infinite (on any rank) changes no weight: its gradients are dropped,
the data position and schedule move on, and it is counted (`nonfinite_steps` in the trainer
state, `skipped` in metrics.jsonl). Three such steps in a row save a checkpoint and stop with an
error naming the steps: the weights are still those of the last good step. (Under DeepSpeed the
engine steps inside `backward`, before the loss is known everywhere: such a step is counted and
stops the run the same way, but its update is not held back.)

A method that makes its own batches each step (PPO generates rollouts) sets `LoopSpec.session`:
`session.batches(step, state)` turns the step's samples (prompts) into `StepBatches`, one or more
optimizer updates each normalised over its own loss units, and its state (JSON) goes into every
checkpoint (`state_dict` / `load_state_dict`). The LR schedule still moves once per step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core import console
from ..core.errors import VicunaError
from ..core.threads import ThreadPolicy
from . import checkpoint
from .checkpoint import TrainerState
from .packing import plan_epoch, split_step, supervised_tokens
from .rundir import Metrics, Progress, log_line


@dataclass
class LoopSpec:
    """What the loop runs: a method's samples and functions, and the run's config (batch, epochs,
    packing, logging and checkpoint cadence are read from it, never copied)."""

    samples: Sequence[Any]
    eval_samples: Sequence[Any]
    collate: Callable[[Sequence[Any]], dict]
    lengths: list[int]
    config: Any  # train/config.py's TrainConfig or a method's subclass
    supervised: Callable[[Sequence[Any]], int] = supervised_tokens
    eval_lengths: list[int] = field(default_factory=list)
    eval_metrics: Callable[[Any, Any, "LoopSpec"], dict] | None = None  # a method's figures beyond eval loss
    session: Any = None  # a method that makes each step's batches itself (module docstring)

    def plans(self) -> list[list[list[int]]]:
        """The steps of each epoch: `epochs` of them, or as many as `max_steps` needs (it wins,
        as in HF Trainer)."""
        plans: list[list[list[int]]] = []
        c = self.config
        while (len(plans) < c.epochs) if not c.max_steps else (sum(map(len, plans)) < c.max_steps):
            plans.append(plan_epoch(self.lengths, len(plans), c.seed, c.batch_size(), c.global_batch_tokens))
        return plans

    def total_steps(self) -> int:
        return self.config.max_steps or sum(len(plan) for plan in self.plans())


NONFINITE_LIMIT = 3  # non-finite steps in a row that stop a run


@dataclass
class StepBatches:
    """What a session makes of one step: the samples of each optimizer update, in order, and the
    step's own figures (asked for after the updates ran). No update: the step is skipped."""

    updates: list[list[Any]]
    figures: Callable[[], dict[str, Any]] = dict


class Stop(Exception):
    """Training stopped early on a signal, after saving a checkpoint."""

    def __init__(self, step: int, path: Path | None, signame: str):
        super().__init__(signame)
        self.step, self.path, self.signame = step, path, signame


class _Signals:
    """SIGTERM (a spot instance's notice) and the first Ctrl-C finish the current step, save a
    checkpoint and stop; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        console.warn(f"{self.received}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(accelerator: Any, module: Any, optimizer: Any, scheduler: Any, spec: LoopSpec, state: TrainerState,
          run_dir: Path, metrics: Metrics, track: bool = False) -> TrainerState:
    world, rank = accelerator.num_processes, accelerator.process_index
    plans = spec.plans()
    total = spec.total_steps()
    params = [p for p in module.parameters() if p.requires_grad]
    progress = Progress(total, state.global_step, accelerator.is_main_process)
    last_save = time.monotonic()
    window = _window()
    threads = ThreadPolicy(spec.config.threads)
    module.train()
    try:
        with _Signals() as signals:
            while state.global_step < total:
                step = plans[state.epoch][state.step_in_epoch]
                started = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss, grad_norm, tokens, n_sup, figures = _step(accelerator, module, optimizer, scheduler, spec,
                                                                step, world, rank, params, state, threads.tick)
                finite = math.isfinite(loss)
                state.nonfinite_steps += not finite
                state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
                seconds = time.perf_counter() - started
                state.global_step += 1
                state.step_in_epoch += 1
                if state.step_in_epoch == len(plans[state.epoch]):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                state.seconds += seconds
                state.tokens += tokens
                state.supervised_tokens += n_sup
                for key, value in (("loss", loss if finite else 0.0), ("steps", int(finite)), ("tokens", tokens),
                                   ("supervised", n_sup), ("seconds", seconds)):
                    window[key] += value
                record = {"step": state.global_step, "total_steps": total, "epoch": state.epoch, "loss": loss,
                          **figures, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                          "supervised_tokens": n_sup, "tokens_per_s": tokens / seconds,
                          "supervised_tokens_per_s": n_sup / seconds, "step_s": seconds, "elapsed_s": state.seconds}
                if not finite:
                    del record["loss"], record["grad_norm"]
                    record["skipped"] = f"non-finite loss ({loss})"
                    if accelerator.is_main_process:
                        console.warn(f"step {state.global_step}: loss is {loss}; the step is skipped (no weight "
                                     f"changed), {state.nonfinite_in_a_row} in a row")
                if spec.eval_samples and spec.config.eval_every and state.global_step % spec.config.eval_every == 0:
                    eval_loss, eval_figures = evaluate(accelerator, module, spec, world, rank)
                    record["eval_loss"] = eval_loss
                    record.update(eval_figures)
                    if spec.eval_metrics:
                        record.update(spec.eval_metrics(accelerator, module, spec))
                metrics.write(record)
                if track:
                    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.global_step)
                if state.nonfinite_in_a_row >= NONFINITE_LIMIT:
                    path = _save(accelerator, scheduler, run_dir, state, spec)
                    first = state.global_step - NONFINITE_LIMIT + 1
                    raise VicunaError(
                        f"the loss was NaN or infinite at steps {first} to {state.global_step} ({NONFINITE_LIMIT} in a row): "
                        f"stopped after step {state.global_step}; checkpoint saved to {path} (weights of step {first - 1})",
                        hint="lower --learning-rate or --max-grad-norm, train in --precision float32, or check the data "
                        "of those steps; --resume auto continues after them")
                progress.update(state.global_step, f"loss {loss:.4f}")
                if window["steps"] and (state.global_step % spec.config.log_every == 0 or state.global_step == total
                                        or "eval_loss" in record):
                    progress.line(log_line({**record, "loss": window["loss"] / window["steps"],
                                            "tokens_per_s": window["tokens"] / window["seconds"],
                                            "supervised_tokens": window["supervised"]})
                                  + (f" | eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
                                  + "".join(f" | {k} {record[k]:.4g}" for k in getattr(spec.session, "log_figures", ())
                                            if isinstance(record.get(k), (int, float))))
                    window = _window()
                due = bool(spec.config.save_every and state.global_step % spec.config.save_every == 0)
                timed = bool(spec.config.save_every_minutes and time.monotonic() - last_save >= spec.config.save_every_minutes * 60)
                stop, timed = _agree(accelerator, bool(signals.received), timed)
                if due or timed or stop:
                    path = _save(accelerator, scheduler, run_dir, state, spec)
                    last_save = time.monotonic()
                    if stop:
                        raise Stop(state.global_step, path, signals.received or "SIGTERM")
            checkpointing = spec.config.save_every or spec.config.save_every_minutes
            if checkpointing and not (checkpoint.checkpoints_dir(run_dir) / f"step-{state.global_step:06d}").is_dir():
                _save(accelerator, scheduler, run_dir, state, spec)
    finally:
        progress.close()
    return state


def _window() -> dict[str, Any]:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "supervised": 0, "seconds": 0.0}


def _agree(accelerator: Any, stop: bool, timed: bool) -> tuple[bool, bool]:
    """Every rank must stop or save at the same step: the main process's clock decides the timed
    save, and a signal seen by any rank stops all of them."""
    if accelerator.num_processes == 1:
        return stop, timed
    flags = torch.tensor([float(stop), float(timed and accelerator.is_main_process)], device=accelerator.device)
    flags = accelerator.reduce(flags, "sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _save(accelerator: Any, scheduler: Any, run_dir: Path, state: TrainerState, spec: LoopSpec) -> Path:
    extra = spec.session.state_dict() if spec.session is not None else None
    return checkpoint.save(accelerator, scheduler, run_dir, state, spec.config.keep_checkpoints, extra)


def split_output(output: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss module's output: the summed loss, and the method's figures (sums) if it gives any."""
    return (output[0], output[1]) if isinstance(output, tuple) else (output, {})


def _step(accelerator: Any, module: Any, optimizer: Any, scheduler: Any, spec: LoopSpec, step: list[int],
          world: int, rank: int, params: list, state: TrainerState, tick: Callable[[], Any] = lambda: None
          ) -> tuple[float, float | None, int, int, dict[str, Any]]:
    if spec.session is None:
        result = _update(accelerator, module, optimizer, spec, spec.samples, spec.lengths, step, world, rank, params, tick)
    else:
        result = _session_step(accelerator, module, optimizer, spec, step, world, rank, params, state, tick)
    scheduler.step()  # a skipped step keeps the schedule a function of the step number
    return result


def _session_step(accelerator: Any, module: Any, optimizer: Any, spec: LoopSpec, step: list[int], world: int,
                  rank: int, params: list, state: TrainerState, tick: Callable[[], Any]
                  ) -> tuple[float, float | None, int, int, dict[str, Any]]:
    """The session's updates in order; a non-finite one ends the step (the ones before it stay)."""
    made = spec.session.batches(step, state)
    started = time.perf_counter()
    losses: list[float] = []
    sums: dict[str, float] = {}
    grad_norm, tokens, n_sup = None, 0, 0
    for samples in made.updates:
        loss, grad_norm, t, n, means = _update(accelerator, module, optimizer, spec, samples, [len(s) for s in samples],
                                               list(range(len(samples))), world, rank, params, tick)
        losses.append(loss)
        tokens, n_sup = tokens + t, n_sup + n
        for name, value in means.items():
            sums[name] = sums.get(name, 0.0) + value
        if not math.isfinite(loss):
            break
    seconds = max(time.perf_counter() - started, 1e-9)
    figures = {name: value / len(losses) for name, value in sums.items()}
    figures.update({**made.figures(), "updates": len(losses), "train_tokens_per_s": tokens / seconds})
    loss = (losses[-1] if not math.isfinite(losses[-1]) else sum(losses) / len(losses)) if losses else math.nan
    return loss, grad_norm, tokens, n_sup, figures


def cast_once_per_update(accelerator: Any, micro_batches: int) -> tuple[Any, Callable[[], Any]]:
    """(a region around an update's micro-batches, a region around each backward). Under bf16/fp16
    autocast every forward casts each weight again, and autocast keeps its casts only until the
    outermost autocast region ends: one region over the whole update casts each weight once (the
    weights change only at the optimizer step, after it), with autocast off again for each
    backward. In a profile of a bf16 PPO update on CPU (5 packed rows) copies (the casts among
    them) were 13 % of the time; timed before and after, the gain was within this machine's
    noise. The gradients are bitwise the same (tested). Not under FSDP/DeepSpeed: they gather, shard or cast the weights themselves."""
    from accelerate.utils import AutocastKwargs

    kind = str(accelerator.distributed_type)
    if micro_batches < 2 or not accelerator.native_amp or "FSDP" in kind or "DEEPSPEED" in kind:
        return contextlib.nullcontext(), contextlib.nullcontext
    return accelerator.autocast(), lambda: accelerator.autocast(AutocastKwargs(enabled=False))


def _update(accelerator: Any, module: Any, optimizer: Any, spec: LoopSpec, pool: Sequence[Any], lengths: Sequence[int],
            step: list[int], world: int, rank: int, params: list, tick: Callable[[], Any] = lambda: None
            ) -> tuple[float, float | None, int, int, dict[str, float]]:
    """One optimizer update over the samples `pool[i] for i in step`."""
    n_sup = spec.supervised([pool[i] for i in step])
    tokens = sum(lengths[i] for i in step)
    micro = split_step(step, lengths, world, rank, spec.config.packing, spec.config.row_capacity, spec.config.micro_batch_size)
    scale = world / max(n_sup, 1)
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    update_region, backward_region = cast_once_per_update(accelerator, len(micro))
    with update_region:
        for k, group in enumerate(micro):
            tick()  # re-check the free CPUs (a micro-batch is one "step" of the thread policy)
            last = k == len(micro) - 1
            accelerator.sync_gradients = last  # DeepSpeed steps on this; DDP/FSDP sync via no_sync below
            context = contextlib.nullcontext() if last else accelerator.no_sync(module)
            with context:
                batch = {key: value.to(accelerator.device) for key, value in spec.collate([pool[i] for i in group]).items()}
                loss_sum, figures = split_output(module(batch))
                with backward_region():
                    accelerator.backward(loss_sum * scale)
            total += loss_sum.detach().double()
            for name, value in figures.items():
                sums[name] = sums.get(name, 0) + value.detach().double()
    # Every rank must agree on skipping a non-finite step: decide on the reduced loss.
    names = sorted(sums)
    packed = torch.stack([total, *(torch.as_tensor(sums[n], device=total.device) for n in names)])
    packed = accelerator.reduce(packed, "sum") if world > 1 else packed
    grad_norm = None
    if torch.isfinite(packed[0]):
        if spec.config.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(params, spec.config.max_grad_norm)
            grad_norm = float(norm) if norm is not None else None
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    means = {name: float(packed[1 + i]) / max(n_sup, 1) for i, name in enumerate(names)}
    return float(packed[0]) / max(n_sup, 1), grad_norm, tokens, n_sup, means


@torch.no_grad()
def evaluate(accelerator: Any, module: Any, spec: LoopSpec, world: int, rank: int) -> tuple[float, dict[str, float]]:
    """Mean loss over the eval samples' loss units (all ranks take part), and the means of the
    method's figures as `eval_` + name."""
    module.eval()
    everything = list(range(len(spec.eval_samples)))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    for group in split_step(everything, spec.eval_lengths, world, rank, spec.config.packing, spec.config.row_capacity,
                            spec.config.micro_batch_size):
        samples = [spec.eval_samples[i] for i in group]
        batch = {key: value.to(accelerator.device) for key, value in spec.collate(samples).items()}
        loss_sum, figures = split_output(module(batch))
        total[0] += loss_sum.double()
        total[1] += spec.supervised(samples)
        for name, value in figures.items():
            sums[name] = sums.get(name, 0) + value.double()
    module.train()
    names = sorted(sums)
    packed = torch.cat([total, torch.stack([torch.as_tensor(sums[n], device=total.device) for n in names])
                        if names else total.new_zeros(0)])
    packed = accelerator.reduce(packed, "sum") if world > 1 else packed
    n = float(packed[1])
    figures = {f"eval_{name}": float(packed[2 + i]) / n if n else math.nan for i, name in enumerate(names)}
    return (float(packed[0]) / n if n else math.nan), figures
