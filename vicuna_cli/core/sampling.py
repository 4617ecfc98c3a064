"""Next-token selection: repetition penalty, temperature, top-k, top-p, then greedy or a draw.

The same maths as transformers' logits processors (RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, applied in that order, as
`generate` does) — `tests/test_sampling.py` checks equality. Written here because importing
`transformers.generation` costs ~0.8 s, a quarter of the cold-start budget on a 2-core laptop.
"""

from __future__ import annotations

from typing import Any, Callable


def make_picker(
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int | None,
    device: Any,
) -> Callable[[Any, Any], Any]:
    """A function (token history [1, n], next-token logits [1, vocab]) -> token id tensor [1]."""
    import torch

    greedy = temperature <= 1e-5
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    def pick(history: Any, logits: Any) -> Any:
        scores = logits.float()
        if repetition_penalty != 1.0:
            scores = apply_repetition_penalty(history, scores, repetition_penalty)
        if greedy:
            return scores.argmax(dim=-1)
        if temperature != 1.0:
            scores = scores / temperature
        if top_k > 0:
            scores = apply_top_k(scores, top_k)
        if top_p < 1.0:
            scores = apply_top_p(scores, top_p)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(-1)

    return pick


def apply_repetition_penalty(history: Any, scores: Any, penalty: float) -> Any:
    """Seen tokens: positive scores divided by the penalty, negative ones multiplied."""
    import torch

    seen = torch.gather(scores, 1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, history, seen)


def apply_top_k(scores: Any, k: int) -> Any:
    import torch

    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: Any, top_p: float) -> Any:
    """Keep the smallest set of most likely tokens whose probabilities add up to more than top_p."""
    import torch

    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))
