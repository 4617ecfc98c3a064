"""vicuna's sampling maths equals transformers' logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vicuna_cli.core.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, draw, make_picker


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 300, generator=g) * 3


@pytest.fixture
def history():
    return torch.tensor([[5, 17, 17, 250, 3]])


def test_repetition_penalty(scores, history):
    assert torch.equal(apply_repetition_penalty(history, scores, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone()))


@pytest.mark.parametrize("k", [1, 5, 299, 1000])
def test_top_k(scores, history, k):
    assert torch.equal(apply_top_k(scores, k), TopKLogitsWarper(k)(history, scores.clone()))


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 0.999])
def test_top_p(scores, history, p):
    assert torch.equal(apply_top_p(scores, p), TopPLogitsWarper(p)(history, scores.clone()))


def test_full_chain_draws_from_transformers_distribution(scores, history):
    """The filtered distribution is transformers' (same processors, same order); each draw is its
    inverse CDF at the request generator's next uniform (sampling.draw, not torch.multinomial)."""
    ours = make_picker(0.7, 0.9, 40, 1.2, seed=11, device="cpu")
    processors = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)]
    reference = scores.clone()
    for processor in processors:
        reference = processor(history, reference)
    cdf = torch.softmax(reference, -1).double().cumsum(-1)
    generator = torch.Generator().manual_seed(11)
    expected = []
    for _ in range(20):
        u = float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(cdf[0, -1])
        expected.append(int((cdf[0] <= u).sum()))  # the first token whose cumulative value exceeds u
    picks = [int(ours(history, scores)) for _ in range(20)]
    assert picks == expected
    assert all(reference[0, t] > float("-inf") for t in picks)  # never a token the filters removed


def test_draw_frequencies_follow_the_distribution():
    """20,000 seeded draws (deterministic): every frequency within 5 standard errors of its
    probability, and tokens of probability 0 (at both ends and inside) never drawn."""
    probs = torch.tensor([[0.0, 0.05, 0.25, 0.0, 0.4, 0.3, 0.0]])
    generator = torch.Generator().manual_seed(3)
    n = 20_000
    counts = torch.bincount(torch.cat([draw(probs, generator) for _ in range(n)]), minlength=7).double()
    freq, p = counts / n, probs[0].double()
    assert counts[p == 0].sum() == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), freq
    assert draw(probs.expand(4, -1), generator).shape == (4,)  # one token per row


def test_greedy_ignores_sampling_options(scores, history):
    pick = make_picker(0.0, 0.1, 3, 1.0, seed=None, device="cpu")
    assert int(pick(history, scores)) == int(scores.argmax())


def test_request_sampler_penalties_follow_openai_and_transformers(scores):
    """Presence/frequency: logit - presence * [count > 0] - frequency * count over output tokens;
    repetition penalty over prompt + output (transformers' maths); then greedy."""
    from types import SimpleNamespace

    from vicuna_cli.core.sampling import RequestSampler

    def params(**kw):
        base = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, seed=None)
        return SimpleNamespace(**{**base, **kw})

    top = int(scores.argmax())
    sampler = RequestSampler(params(presence_penalty=2.0, frequency_penalty=1.5), [top], "cpu")
    assert sampler.pick(scores) == top  # the prompt does not count for OpenAI penalties
    for token in (top, top, 7):
        sampler.observe(token)
    expected = scores.clone()
    expected[0, top] -= 2.0 + 1.5 * 2
    expected[0, 7] -= 2.0 + 1.5 * 1
    assert int(expected.argmax()) != top  # the penalty really moves the choice
    assert sampler.pick(scores) == int(expected.argmax())
    assert not sampler.is_plain_greedy

    rep = RequestSampler(params(repetition_penalty=1.3), [5, 17], "cpu")
    rep.observe(250)
    history = torch.tensor([[5, 17, 250]])
    assert rep.pick(scores) == int(RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone()).argmax())
