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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading tokens `a` and `b` share, leaving each at least its last token in its own tail."""
    most = min(len(a), len(b)) - 1
    n = 0
    while n < most and a[n] == b[n]:
        n += 1
    return n


def shared_prefix_row(pairs: Sequence[tuple[Sequence[int], Sequence[int], int]]) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
    """One packed row of [common prefix, first tail, second tail] per pair (first, second, shared
    prefix length), and its 4D boolean mask (True: may attend): each tail sees the prefix and
    itself causally, never the other tail nor another pair; the second tail's positions continue
    from the prefix as in its own sequence. Causal attention gives every token the hidden state it
    has in its whole sequence, while the prefix (a pair's prompt) is computed once. Returns the
    tensors and each pair's placement for `row_position`."""
    import torch

    ids: list[int] = []
    positions: list[int] = []
    pair: list[int] = []
    branch: list[int] = []  # 0 prefix, 1 first tail, 2 second tail
    placements = []
    for k, (first, second, n) in enumerate(pairs):
        placements.append((len(ids), n, len(first)))
        ids += list(first) + list(second[n:])
        positions += list(range(len(first))) + list(range(n, len(second)))
        pair += [k] * (len(first) + len(second) - n)
        branch += [0] * n + [1] * (len(first) - n) + [2] * (len(second) - n)
    pair_of, branch_of, at = torch.tensor(pair), torch.tensor(branch), torch.arange(len(ids))
    mask = ((pair_of[:, None] == pair_of[None, :]) & (at[None, :] <= at[:, None])
            & ((branch_of[None, :] == 0) | (branch_of[None, :] == branch_of[:, None])))
    return ({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
             "attention_mask": mask[None, None]}, placements)


def row_position(placement: tuple[int, int, int], side: int, t: int) -> int:
    """Where token `t` of a pair's first (side 0) or second (side 1) sequence sits in its shared row."""
    start, shared, first = placement
    return start + t if side == 0 or t < shared else start + first + t - shared
