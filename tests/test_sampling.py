"""vicuna's sampling maths equals transformers' logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vicuna_cli.core.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, make_picker


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


def test_full_chain_draws_like_transformers(scores, history):
    """Same filtered distribution -> the same draws from the same generator state."""
    ours = make_picker(0.7, 0.9, 40, 1.2, seed=11, device="cpu")
    processors = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)]
    reference = scores.clone()
    for processor in processors:
        reference = processor(history, reference)
    generator = torch.Generator().manual_seed(11)
    expected = [int(torch.multinomial(torch.softmax(reference, -1), 1, generator=generator)) for _ in range(20)]
    assert [int(ours(history, scores)) for _ in range(20)] == expected


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
