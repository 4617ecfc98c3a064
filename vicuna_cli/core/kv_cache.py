"""The native engine's key/value cache and the row layout of one forward (continuous batching).

Split from native_llama.py (the model itself): these hold no weights, only per-sequence slots of
keys and values and the positions/masks a step of many sequences at different lengths needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


class SlotKVCache:
    """Key/value buffers for `num_slots` independent sequences (continuous batching).

    Per layer one [num_slots, kv_heads, capacity, head_dim] tensor for keys and one for values;
    a sequence owns one slot for its whole life, so sequences join and leave a running batch
    without any copying. `lengths[slot]` is how many tokens the slot holds. The time dimension
    starts at `capacity` and doubles when a sequence needs more (up to `max_capacity`): a full
    preallocation of 16 slots x SmolLM2's 8192-token context would be ~3 GB in bf16. Buffers are
    zero-filled, because attention reads every slot up to the longest one in the batch (the
    positions a row does not own are masked, but 0 x NaN from uninitialised memory is NaN).
    With one slot it is the batch-1 cache of `model(..., past_key_values=cache)`.
    """

    def __init__(self, num_layers: int, num_slots: int = 1, capacity: int = 256, max_capacity: int | None = None):
        self.num_slots = num_slots
        self.capacity = max(capacity, 16)
        self.max_capacity = max_capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_slots

    @property
    def length(self) -> int:  # batch-1 use: the one slot's length
        return self.lengths[0]

    def _reserve(self, layer: int, like: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[2]:
            size = max(self.capacity, end) if buf_k is None else max(2 * buf_k.shape[2], end)
            if self.max_capacity:
                size = min(size, max(self.max_capacity, end))
            shape = (self.num_slots, like.shape[1], size, like.shape[3])
            new_k, new_v = like.new_zeros(shape), like.new_zeros(shape)
            if buf_k is not None:
                old = buf_k.shape[2]
                new_k[:, :, :old] = buf_k
                new_v[:, :, :old] = buf_v
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        return buf_k, buf_v

    def write_chunk(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """k, v [1, kv_heads, n, d] at positions start.. of `slot`; returns the slot's keys/values so far."""
        end = start + k.shape[2]
        buf_k, buf_v = self._reserve(layer, k, end)
        buf_k[slot, :, start:end] = k[0]
        buf_v[slot, :, start:end] = v[0]
        return buf_k[slot : slot + 1, :, :end], buf_v[slot : slot + 1, :, :end]

    def write_rows(self, layer: int, rows: "Rows", k: torch.Tensor, v: torch.Tensor):
        """One new token per row (k, v [B, kv_heads, 1, d]) at each row's own position; returns
        the rows' keys/values up to the longest row, [B, kv_heads, rows.length, d]."""
        buf_k, buf_v = self._reserve(layer, k, rows.length)
        if rows.view is not None and rows.same_position is not None:  # e.g. batch 1: plain slices
            p = rows.same_position
            buf_k[rows.view, :, p : p + 1] = k
            buf_v[rows.view, :, p : p + 1] = v
        else:
            buf_k[rows.slots, :, rows.positions] = k[:, :, 0]
            buf_v[rows.slots, :, rows.positions] = v[:, :, 0]
        if rows.view is not None:  # consecutive slots: a view, no copy
            return buf_k[rows.view, :, : rows.length], buf_v[rows.view, :, : rows.length]
        return buf_k[rows.slots, :, : rows.length], buf_v[rows.slots, :, : rows.length]

    def shrink(self) -> bool:
        """Give back the time capacity no sequence needs any more: once the one long sequence that
        doubled every slot's buffers up to 8,192 positions (~3 GB for SmolLM2's 16 slots in
        bf16) has left, keep twice what the longest one holds (at least `capacity`). Only when
        that halves the buffers at least, so that sizes do not flap. True when it shrank."""
        buf = self.keys[0]
        if buf is None:
            return False
        longest = max(self.lengths)
        keep = max(self.capacity, 2 * longest)
        if buf.shape[2] < 2 * keep:
            return False
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            shape = (*k.shape[:2], keep, k.shape[3])
            new_k, new_v = k.new_zeros(shape), v.new_zeros(shape)
            new_k[:, :, :longest] = k[:, :, :longest]
            new_v[:, :, :longest] = v[:, :, :longest]
            self.keys[layer], self.values[layer] = new_k, new_v
        return True

    def move(self, src: int, dst: int) -> None:
        """Give `src`'s sequence to the empty slot `dst` (one copy of its keys and values)."""
        n = self.lengths[src]
        for buf in (*self.keys, *self.values):
            if buf is not None and n:
                buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots' sequences (one copy of each)."""
        n = max(self.lengths[a], self.lengths[b])
        for buf in (*self.keys, *self.values):
            if buf is not None and n:
                buf[[a, b], :, :n] = buf[[b, a], :, :n]  # the right side is a copy (advanced indexing)
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def read(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Positions start..end of `slot` for every layer: [layers, 2, kv_heads, end - start, d]."""
        return torch.stack(
            [torch.stack((k[slot, :, start:end], v[slot, :, start:end])) for k, v in zip(self.keys, self.values)]
        )

    def write_prefix(self, slot: int, kv: torch.Tensor) -> None:
        """Fill positions 0..n of `slot` from `read`'s layout (a reused prefix); the slot then holds n."""
        n = kv.shape[3]
        for layer in range(len(self.keys)):
            buf_k, buf_v = self._reserve(layer, kv[layer, 0][None], n)
            buf_k[slot, :, :n] = kv[layer, 0]
            buf_v[slot, :, :n] = kv[layer, 1]
        self.lengths[slot] = n


KVCache = SlotKVCache  # the batch-1 name


@dataclass
class Rows:
    """A batched decode step: row b feeds one token at `positions[b]` of slot `slots[b]`."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long
    length: int  # the longest row after this step (keys to attend to)
    mask: torch.Tensor | None  # [B, 1, 1, length] bool, None when every row has the same length
    view: slice | None  # the rows' slots as a slice when they are consecutive and in order
    same_position: int | None  # the common position when every row is at the same one

    @classmethod
    def make(cls, slots: list[int], positions: list[int], device: Any) -> "Rows":
        length = max(positions) + 1
        same = positions[0] if all(p == positions[0] for p in positions) else None
        consecutive = all(b - a == 1 for a, b in zip(slots, slots[1:]))
        pos = torch.tensor(positions, device=device)
        mask = None
        if same is None:
            mask = (torch.arange(length, device=device)[None, :] <= pos[:, None])[:, None, None, :]
        return cls(
            slots=torch.tensor(slots, device=device),
            positions=pos,
            length=length,
            mask=mask,
            view=slice(slots[0], slots[-1] + 1) if consecutive else None,
            same_position=same,
        )


@dataclass
class Segments:
    """A ragged prefill: chunk i is `lengths[i]` tokens of slot `slots[i]` from position
    `starts[i]`, at `offsets[i]` in the concatenated input."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]
    offsets: list[int] = field(init=False)  # computed once: every layer iterates the segments

    def __post_init__(self) -> None:
        self.offsets = list(itertools.accumulate(self.lengths, initial=0))[:-1]

    def __iter__(self):
        return iter(zip(self.slots, self.starts, self.lengths, self.offsets))
