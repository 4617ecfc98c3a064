"""Which samples make up each optimizer step, and how they become tensors.

The plan is a pure function of (seed, epoch, sample lengths, global batch): every rank computes
the same plan, a resumed run skips to (epoch, step), and neither the world size nor the
micro-batch split changes which samples an optimizer step sees. Only the split of a step into
micro-batches depends on the rank.

Packing (on by default) puts several samples in one row without padding, best-fit-decreasing;
position ids restart at 0 for each sample, which is how transformers 5 finds the sample
boundaries when no attention mask is passed (`masking_utils.find_packed_sequence_indices` gives
SDPA/eager a block-diagonal causal mask; flash-attn 2 uses varlen kernels for a single row).
The first label of each sample is -100, so no sample is asked to predict the next one's start.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Sequence

from .labels import IGNORE, Sample


def plan_epoch(lengths: Sequence[int], epoch: int, seed: int, batch_size: int | None = None,
               batch_tokens: int | None = None) -> list[list[int]]:
    """Sample indices of each optimizer step of `epoch` (a seeded shuffle, then cut into batches
    of `batch_size` samples or of at most `batch_tokens` tokens)."""
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    if batch_size is not None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    assert batch_tokens is not None
    steps: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + lengths[index] > batch_tokens:
            steps.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        steps.append(current)
    return steps


def best_fit_decreasing(items: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack `items` (indices into `lengths`) into as few bins of `capacity` tokens as BFD finds:
    longest first, each into the fullest bin it still fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted
    for index in sorted(items, key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, number = free.pop(at)
            bins[number].append(index)
            bisect.insort(free, (room - size, number))
        else:
            bins.append([index])
            bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


def split_step(step: Sequence[int], lengths: Sequence[int], world: int, rank: int, packing: bool,
               capacity: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one step. Every rank gets the same number (FSDP and DeepSpeed
    need the same count of forward passes everywhere); a rank short of work gets empty ones."""
    if packing:
        groups = best_fit_decreasing(step, lengths, capacity)
    else:  # similar lengths together, so padding to the longest of a micro-batch stays small
        ordered = sorted(step, key=lambda i: (-lengths[i], i))
        groups = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    groups.sort(key=lambda g: (-sum(lengths[i] for i in g), g))
    per_rank = -(-len(groups) // world)
    mine = groups[rank::world]
    return mine + [[] for _ in range(per_rank - len(mine))]


def shifted(labels: list[int]) -> list[int]:
    """targets[t] = labels[t + 1]: what the token at t must predict."""
    return labels[1:] + [IGNORE]


def collate(samples: Sequence[Sample], packing: bool, pad_id: int) -> dict[str, Any]:
    """Tensors for one micro-batch: one packed row [1, L] (no attention mask, position ids reset
    per sample), or rows padded to the longest sample with an attention mask."""
    import torch

    if not samples:  # an empty micro-batch: one ignored token keeps the ranks in step
        return {"input_ids": torch.tensor([[pad_id]]), "position_ids": torch.tensor([[0]]),
                "targets": torch.tensor([[IGNORE]])}
    if packing:
        ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        for sample in samples:
            ids += sample.input_ids
            positions += range(len(sample))
            labels += [IGNORE] + sample.labels[1:]
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "targets": torch.tensor([shifted(labels)])}
    width = max(len(s) for s in samples)
    ids_rows, mask_rows, target_rows = [], [], []
    for sample in samples:
        pad = width - len(sample)
        ids_rows.append(sample.input_ids + [pad_id] * pad)
        mask_rows.append([1] * len(sample) + [0] * pad)
        target_rows.append(shifted(sample.labels) + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids_rows), "attention_mask": torch.tensor(mask_rows),
            "position_ids": torch.arange(width).expand(len(samples), -1).clone(),
            "targets": torch.tensor(target_rows)}


def supervised_tokens(samples: Sequence[Sample]) -> int:
    """Tokens that carry loss (the first label of each sample is never one)."""
    return sum(sum(1 for label in s.labels[1:] if label != IGNORE) for s in samples)
