"""Prefix caching: prompts that start with the same tokens reuse the keys/values computed once.

Every request to a chat server starts with the template's system prompt, and each turn of a
chat repeats the whole conversation so far; vLLM ("automatic prefix caching") and SGLang
(RadixAttention) skip that repeated prefill, and so does this. Token sequences are cut into
blocks of `BLOCK` tokens; a block is stored under (its parent block's id, its tokens), so a
block is only ever matched after exactly the same preceding tokens (a trie, no hashing and no
collisions). A block holds the keys and values of its tokens for every layer,
[layers, 2, kv_heads, BLOCK, head_dim], copied out of a finished request's slot.

Memory is bounded by `max_bytes`; the least recently used blocks go first. A lookup touches
the matched path from the leaf up, so parents are always more recent than their children and
eviction trims sequences from their ends.

Reused keys/values are bit-for-bit those the first request computed; the rest of the prompt is
then prefilled from the end of the reused part, so its chunk boundaries (and the last-bit
rounding of a few matmuls) can differ from an uncached run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

BLOCK = 8
DEFAULT_MAX_BYTES = 256 * 2**20  # 256 MiB: ~5,800 tokens of SmolLM2-135M in fp32


Key = tuple[int, tuple[int, ...]]  # (parent block id, this block's token ids)


@dataclass
class Block:
    id: int
    kv: Any  # [layers, 2, kv_heads, BLOCK, head_dim]
    parent: "Block | None"
    children: set[Key] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max(0, int(max_bytes))
        self.blocks: OrderedDict[Key, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self._next_id = 1  # 0 is the root (the empty prefix)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _walk(self, ids: list[int], limit: int) -> list[Key]:
        """Keys of the stored blocks covering the longest whole-block prefix of ids[:limit]."""
        path: list[Key] = []
        parent = 0
        for start in range(0, limit - BLOCK + 1, BLOCK):
            key = (parent, tuple(ids[start : start + BLOCK]))
            block = self.blocks.get(key)
            if block is None:
                break
            path.append(key)
            parent = block.id
        return path

    def match(self, ids: list[int], limit: int) -> list[Block]:
        """The stored blocks that cover the longest prefix of ids[:limit] (whole blocks only)."""
        path = self._walk(ids, limit)
        self._touch(path)
        return [self.blocks[key] for key in path]

    def insert(self, ids: list[int], read_kv: Any) -> None:
        """Store the whole blocks of `ids` not stored yet. `read_kv(start, end)` returns the
        keys/values of positions start..end as [layers, 2, kv_heads, end - start, head_dim]."""
        if not self.enabled:
            return
        path = self._walk(ids, len(ids))
        first_new = BLOCK * len(path)
        end = (len(ids) // BLOCK) * BLOCK
        if first_new >= end:
            return
        parent = self.blocks[path[-1]] if path else None
        kv = read_kv(first_new, end)
        for offset in range(0, end - first_new, BLOCK):
            start = first_new + offset
            key = (parent.id if parent else 0, tuple(ids[start : start + BLOCK]))
            block = Block(self._next_id, kv[:, :, :, offset : offset + BLOCK].clone(), parent)
            if block.nbytes > self.max_bytes:
                return
            self._next_id += 1
            if parent is not None:
                parent.children.add(key)
            self.blocks[key] = block
            self.bytes += block.nbytes
            parent = block
            self._evict()
            if key not in self.blocks:  # the budget holds fewer blocks than this sequence
                break
        self._touch(self._walk(ids, len(ids)))

    def _touch(self, path: list[Key]) -> None:
        for key in reversed(path):  # leaf first, so parents end up the most recent
            self.blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self.blocks:
            self._drop(next(iter(self.blocks)))

    def _drop(self, key: Key) -> None:
        block = self.blocks.pop(key, None)
        if block is None:
            return
        self.bytes -= block.nbytes
        if block.parent is not None:
            block.parent.children.discard(key)
        for child in list(block.children):  # unreachable without their parent
            self._drop(child)
