"""The PPO session: what `train ppo` does at each step of the shared loop before its updates
(rollouts, scores, reference log-probs, advantages) and the state it keeps between steps."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core import console
from ..core.errors import VicunaError
from ..core.store import atomic_write_text
from .loop import StepBatches
from .ppo import SAMPLES, PpoConfig, PpoLoss, Rollout, RewardFn, collate, policy_outputs
from .ppo_math import KLController, RunningMoments, gae, token_rewards, whiten
from .rollout import generate, sampling_dtype

SAMPLES_PER_LOG = 16  # rollouts written to samples.jsonl per logged step


def prepare(config: PpoConfig, setup: Any, spec: Any, accelerator: Any, run_dir: Path, reward: RewardFn | None = None
            ) -> tuple[list, list, Any]:
    """The method hook of sft.run_training: the value head (in the loss), the reference, the reward
    and the session that makes each step's batches."""
    from .modeling import causal_lm

    main = accelerator.is_main_process
    kind = str(accelerator.distributed_type)
    if "FSDP" in kind or "DEEPSPEED" in kind:
        raise VicunaError(f"train ppo runs in one process or under DDP, not {kind}: rollouts are generated from the "
                          "policy's whole weights on each device",
                          hint="use --accelerate-config recipes/accelerate/ddp.yaml (with --lora for large models)")
    lm = causal_lm(setup.model)
    loss = PpoLoss(lm.config.hidden_size, config).to(next(lm.parameters()).device)
    if reward is None:
        reward = RewardScorer(config, setup.tokenizer, main, accelerator.mixed_precision)
    reference = None
    if not config.lora:
        reference = _frozen_copy(setup, next(lm.parameters()).device)
    if main:
        console.info("reference: " + ("the base model with the LoRA adapter disabled" if config.lora
                                      else f"a frozen copy of {config.model}")
                     + f" · KL coefficient {config.kl_coef}"
                     + (f", adaptive towards KL {config.target_kl}" if config.target_kl else " (fixed)"))
    spec.session = PpoSession(config, setup, spec, accelerator, run_dir, loss, reward, reference)
    return spec.samples, [], loss


def _frozen_copy(setup: Any, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    from ..core import models

    with models._quiet_transformers():
        ref = models.load_pretrained(AutoModelForCausalLM, setup.path, dtype=torch.float32,
                                     attn_implementation=setup.attention)
    ref.requires_grad_(False)
    return ref.to(device).eval()


class RewardScorer:
    """The reward model's score of prompt + answer, rendered with the reward model's template and
    tokenized with its tokenizer (so a reward model with another tokenizer works too)."""

    def __init__(self, config: PpoConfig, policy_tokenizer: Any, main: bool, mixed_precision: str = "no"):
        from .modeling import training_device
        from .score import RewardModel

        assert config.reward_model is not None
        self.model = RewardModel(config.reward_model, config.reward_device, None)
        # Rows as long as the training's: a packed row's masked attention is quadratic in its length
        # (computed for SmolLM2: ~1/3 of the linear layers' FLOPs in a 1,000-token row, ~1/12 in 256)
        self.batch_tokens = config.row_capacity
        # The policy's precision where the reward model shares its device (bf16 on a CPU with native bf16)
        self.precision = mixed_precision if self.model.device == training_device(config) else "no"
        if main and self.model.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            console.info("the reward model's tokenizer differs from the policy's: answers are decoded and "
                         "re-tokenised with the reward model's tokenizer and template")

    def __call__(self, prompts: list, answers: list, answer_ids: list) -> list[float]:
        conversations = [[*messages, {"role": "assistant", "content": text}] for messages, text in zip(prompts, answers)]
        return self.model.score(self.model.encode(conversations), self.batch_tokens, self.precision)


class PpoSession:
    log_figures = ("reward", "kl", "kl_coef", "entropy", "clip_fraction", "rollout_tokens_per_s")  # in the log line

    def __init__(self, config: PpoConfig, setup: Any, spec: Any, accelerator: Any, run_dir: Path, loss: PpoLoss,
                 reward: RewardFn, reference: Any):
        self.config, self.setup, self.spec, self.accelerator = config, setup, spec, accelerator
        self.run_dir, self.loss, self.reward, self.reference = run_dir, loss, reward, reference
        self.kl = KLController(config.kl_coef, config.target_kl or None, config.kl_horizon)
        self.moments = RunningMoments()
        self.main = accelerator.is_main_process
        self.engine_told = False
        weights = next(setup.model.parameters())
        self.rollout_dtype = sampling_dtype(config.rollout_dtype, weights.dtype, weights.device)

    # -- state in the checkpoints ------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl.state_dict(), "score_moments": asdict(self.moments)}

    def load_state_dict(self, state: dict | None, trainer_state: Any) -> None:
        if state is None:
            raise VicunaError("the checkpoint holds no PPO state (KL controller, score moments): it is not a "
                              "`train ppo` checkpoint", hint="resume a `train ppo` run, or start a new one")
        self.kl = KLController(**state["kl_controller"])
        self.moments = RunningMoments(**state["score_moments"])
        path = self.run_dir / SAMPLES
        if self.main and path.is_file():  # samples past the checkpoint are drawn again
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= trainer_state.global_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    # -- one step ------------------------------------------------------------------------------

    def batches(self, step: list[int], state: Any) -> StepBatches:
        config, number = self.config, state.global_step + 1
        prompts = [self.spec.samples[i] for i in step]
        # Each prompt's sampler has its own seed: a resumed run draws the same answers.
        seeds = [(config.seed * 1_000_003 + number * 10_007 + k) % (1 << 31) for k in range(len(prompts))]
        answers, seconds, engine = generate(self.setup.model, self.setup.tokenizer, [p.ids for p in prompts], seeds,
                                            config.max_new_tokens, config.max_length, len(prompts), dtype=self.rollout_dtype)
        if self.main and not self.engine_told:
            weights = "the policy's current weights" if self.rollout_dtype is None else \
                f"a {str(self.rollout_dtype).removeprefix('torch.')} copy of the policy's current weights (--rollout-dtype)"
            console.info(f"rollouts: the {engine} path of the batch engine, on {weights}")
            self.engine_told = True
        texts = [self.setup.tokenizer.decode(a.ids, skip_special_tokens=True) for a in answers]
        started = time.perf_counter()
        scores = torch.tensor([float(s) for s in self.reward([p.messages for p in prompts], texts, [a.ids for a in answers])],
                              dtype=torch.float64)
        generated = sum(len(a.ids) for a in answers)
        figures = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "kl_coef": self.kl.value, "answer_tokens": generated / len(answers),
                   "stopped": sum(a.finish_reason == "stop" for a in answers) / len(answers),
                   "rollout_tokens": generated, "rollout_s": seconds, "rollout_tokens_per_s": generated / max(seconds, 1e-9),
                   "score_s": time.perf_counter() - started}
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).sum())
            if self.main:
                console.warn(f"step {number}: {bad} reward(s) NaN or infinite: the step is skipped")
            return StepBatches([], lambda: {**figures, "nonfinite_rewards": bad})
        started = time.perf_counter()
        rollouts, kl_sum = self._rollouts(prompts, answers, self._scale(scores))
        figures["logprobs_s"] = time.perf_counter() - started  # old policy, reference, advantages
        figures["kl"] = kl_sum / len(answers)
        self.kl.update(figures["kl"], len(answers))
        if config.log_samples and number % config.log_samples == 0 and self.main:
            self._log_samples(number, prompts, texts, scores)
        order = random.Random(f"{config.seed}:{number}")
        size = config.mini_batch_size or len(rollouts)
        updates = []
        for _ in range(config.ppo_epochs):
            shuffled = order.sample(rollouts, len(rollouts))
            updates += [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
        return StepBatches(updates, lambda: figures)

    def _scale(self, scores: torch.Tensor) -> torch.Tensor:
        if self.config.whiten_rewards:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / self.moments.std
        if self.config.reward_clip:
            scores = scores.clamp(-self.config.reward_clip, self.config.reward_clip)
        return scores

    @torch.no_grad()
    def _rollouts(self, prompts: Sequence[Any], answers: Sequence[Any], scores: torch.Tensor) -> tuple[list[Rollout], float]:
        """Old log-probs and values (policy), reference log-probs, then rewards and GAE."""
        config = self.config
        empty = torch.zeros(0)
        bare = [Rollout(p.ids + a.ids, len(p.ids), empty, empty, empty, empty) for p, a in zip(prompts, answers)]
        logprobs, values, _ = self._forward(self.setup.model, bare)
        if self.reference is not None:
            ref_logprobs, _, _ = self._forward(self.reference, bare)
        else:
            with self.setup.model.disable_adapter():
                ref_logprobs, _, _ = self._forward(self.setup.model, bare)
        lengths = [len(a.ids) for a in answers]
        rewards, kl = token_rewards(scores, logprobs.double(), ref_logprobs.double(), lengths, self.kl.value)
        advantages, returns = gae(rewards, values.double(), lengths, config.gamma, config.lam)
        advantages = whiten(advantages)
        out, start = [], 0
        for sample, n in zip(bare, lengths):
            part = slice(start, start + n)
            out.append(Rollout(sample.ids, sample.prompt_length, logprobs[part], values[part],
                               advantages[part].float(), returns[part].float()))
            start += n
        return out, float(kl.sum())

    def _forward(self, model: Any, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per answer token, in rollout order: log-prob, value, entropy (packed rows as in training)."""
        from .packing import best_fit_decreasing

        lengths = [len(r) for r in rollouts]
        groups = best_fit_decreasing(range(len(rollouts)), lengths, self.spec.config.row_capacity) if self.spec.config.packing \
            else [[i] for i in range(len(rollouts))]
        per: dict[int, tuple] = {}
        device = self.accelerator.device
        with self.accelerator.autocast():  # one region over all rows: each weight is cast once, not once per row
            for group in groups:
                group = sorted(group)
                batch = {k: v.to(device) for k, v in collate([rollouts[i] for i in group], self.spec.config.packing, 0).items()}
                logprobs, values, entropy = policy_outputs(model, self.loss.v_head, batch)
                start = 0
                for i in group:
                    n = rollouts[i].n_supervised
                    per[i] = (logprobs[start:start + n].float().cpu(), values[start:start + n].float().cpu(),
                              entropy[start:start + n].float().cpu())
                    start += n
        return tuple(torch.cat([per[i][k] for i in range(len(rollouts))]) for k in range(3))  # type: ignore[return-value]

    def _log_samples(self, number: int, prompts: Sequence[Any], texts: list[str], scores: torch.Tensor) -> None:
        rows = [{"step": number, "id": p.id, "prompt": p.messages, "answer": text, "reward": float(score)}
                for p, text, score in list(zip(prompts, texts, scores))[:SAMPLES_PER_LOG]]
        path = self.run_dir / SAMPLES
        before = path.read_text() if path.is_file() else ""
        atomic_write_text(path, before + "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
