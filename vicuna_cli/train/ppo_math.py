"""The arithmetic of PPO for language models (Ziegler et al. 2019; as in trlX and TRL), on the
flat per-token tensors of a rollout batch: no padding, each sequence a run of answer tokens.

- reward per token: -kl_coef * (log π(a_t) - log π_ref(a_t)), plus the clipped (and optionally
  whitened) reward-model score on the last answer token;
- GAE over each sequence's tokens (the value after the last token is 0);
- clipped policy loss max(-A·r, -A·clip(r, 1±ε)) and clipped value loss
  ½·max((V - R)², (clip(V, V_old ± ε_v) - R)²), returned per token: the shared loop sums them and
  divides by the answer tokens of the whole update;
- the adaptive KL controller: β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, lengths: Sequence[int],
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl) per token, flat over the batch's sequences of `lengths` answer tokens."""
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    ends = torch.tensor(list(lengths)).cumsum(0) - 1
    rewards[ends] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, lengths: Sequence[int], gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) per token by generalised advantage estimation, sequence by sequence."""
    advantages = torch.zeros_like(values)
    start = 0
    for n in lengths:
        running = 0.0
        for t in reversed(range(start, start + n)):
            following = values[t + 1] if t + 1 < start + n else 0.0
            delta = rewards[t] + gamma * following - values[t]
            running = delta + gamma * lam * running
            advantages[t] = running
        start += n
    return advantages, advantages + values


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    mean, var = values.mean(), values.var(unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per token, 1.0 where the clipped term was the larger one)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logprobs.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per token, 1.0 where the clipped term was the larger one)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


@dataclass
class KLController:
    """Adaptive (Ziegler et al.) when `target` is set, else fixed at `value`."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update),
    to whiten scores across steps rather than within one small batch."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n = xs.numel()
        batch_mean, batch_var = float(xs.mean()), float(xs.var(unbiased=False))
        delta = batch_mean - self.mean
        total = self.count + n
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))
