"""PPO's arithmetic against plain reference implementations written here (padded [batch, time]
tensors with a mask, as trlX lays them out) on fixed tensors, and the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from vicuna_cli.train.ppo_math import KLController, RunningMoments, gae, policy_loss, token_rewards, value_loss, whiten

LENGTHS = [3, 1, 4]


def padded(flat: torch.Tensor) -> torch.Tensor:
    rows, start = [], 0
    for n in LENGTHS:
        rows.append(torch.cat([flat[start:start + n], flat.new_zeros(max(LENGTHS) - n)]))
        start += n
    return torch.stack(rows)


def mask() -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (max(LENGTHS) - n) for n in LENGTHS], dtype=torch.float64)


def reference_gae(rewards, values, m, gamma, lam):
    """trlX's loop over time on padded rows (values past a row's end are 0)."""
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        following = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * m, (advantages + values) * m


def test_gae_equals_the_padded_reference():
    g = torch.Generator().manual_seed(0)
    n = sum(LENGTHS)
    rewards, values = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        advantages, returns = gae(rewards, values, LENGTHS, gamma, lam)
        want_a, want_r = reference_gae(padded(rewards), padded(values), mask(), gamma, lam)
        torch.testing.assert_close(padded(advantages), want_a, rtol=0, atol=1e-12)
        torch.testing.assert_close(padded(returns), want_r, rtol=0, atol=1e-12)
    # gamma = lam = 1: the advantage is the sum of the rewards to go minus the value
    advantages, _ = gae(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 0.0]), [3], 1.0, 1.0)
    assert advantages.tolist() == [5.5, 4.75, 3.0]


def test_token_rewards_put_the_score_on_the_last_answer_token():
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -1.0, -1.0], dtype=torch.float64)
    rewards, kl = token_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, [3, 1], kl_coef=0.1)
    assert kl.tolist() == [0.5, 0.0, 0.5, -2.0]
    torch.testing.assert_close(rewards, torch.tensor([-0.05, 0.0, 10.0 - 0.05, 20.0 + 0.2], dtype=torch.float64))


def reference_losses(logprobs, old_logprobs, advantages, values, old_values, returns, m, cliprange, cliprange_value,
                     vf_coef):
    """trlX's AccelerateRLTrainer loss on padded rows: masked means over all tokens."""
    n = m.sum()
    vclipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (vclipped - returns) ** 2
    vf_loss = 0.5 * torch.sum(torch.max(vf1, vf2) * m) / n
    vf_clipfrac = torch.sum((vf2 > vf1).double() * m) / n
    ratio = torch.exp((logprobs - old_logprobs) * m)
    pg1, pg2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg1, pg2) * m) / n
    pg_clipfrac = torch.sum((pg2 > pg1).double() * m) / n
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


def test_clipped_policy_and_value_losses_equal_the_reference():
    g = torch.Generator().manual_seed(1)
    n = sum(LENGTHS)
    t = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in ("adv", "values", "old_values", "returns")}
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.4  # ratios on both sides of the clip range
    cliprange, cliprange_value, vf_coef = 0.2, 0.3, 0.5
    pg, pg_clipped = policy_loss(new, old, t["adv"], cliprange)
    vf, vf_clipped = value_loss(t["values"], t["old_values"], t["returns"], cliprange_value)
    ours = ((pg + vf_coef * vf).sum() / n, pg.sum() / n, vf.sum() / n, pg_clipped.sum() / n, vf_clipped.sum() / n)
    want = reference_losses(padded(new), padded(old), padded(t["adv"]), padded(t["values"]), padded(t["old_values"]),
                            padded(t["returns"]), mask(), cliprange, cliprange_value, vf_coef)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert 0 < float(ours[3]) < 1 and 0 < float(ours[4]) < 1  # both clips were exercised


def test_whiten_gives_zero_mean_unit_variance():
    x = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    w = whiten(x)
    assert abs(float(w.mean())) < 1e-12 and abs(float(w.var(unbiased=False)) - 1) < 1e-6


def test_adaptive_kl_controller_follows_ziegler():
    kl = KLController(0.2, target=6.0, horizon=10000)
    kl.update(9.0, n_steps=256)  # error 0.5 clipped to 0.2
    assert kl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    kl.update(3.0, n_steps=100)  # error -0.5 clipped to -0.2
    assert kl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 100 / 10000))
    before = kl.value
    kl.update(6.6, n_steps=1000)  # within the clip: error 0.1
    assert kl.value == pytest.approx(before * (1 + 0.1 * 1000 / 10000))
    kl.update(math.nan, n_steps=1000)  # a skipped step does not move it
    assert kl.value == pytest.approx(before * 1.01)
    fixed = KLController(0.05, target=None)
    fixed.update(100.0, n_steps=10**6)
    assert fixed.value == 0.05
    assert KLController(**kl.state_dict()) == kl  # what a checkpoint restores


def test_running_moments_equal_the_moments_of_everything_seen():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(k, generator=g, dtype=torch.float64) * 3 + 1 for k in (5, 1, 8)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)))
