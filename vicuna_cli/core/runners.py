"""Model runners: how one model runs the prefills and decode steps of core/batch.py's BatchEngine,
one slot per sequence.

On the native Llama model (core/native_llama.py) a decode step is one forward over all rows,
each at its own position in its own slot of a preallocated KV cache (`NativeRunner`). Other
models (transformers' implementations) run one forward per request per step with their own cache
(`SequentialRunner`): interleaved, so requests still join and leave between steps, but without
the batching speed-up (re-laying transformers' cache for joins and leaves on every step would
cost more than it saves on CPU).
"""

from __future__ import annotations

from typing import Any

from .prefix_cache import PrefixCache


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing): the
    activations of a long prefill are freed into malloc's heap, which otherwise keeps them."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class NativeRunner:
    """The native Llama model: one slot of a SlotKVCache per sequence, one forward per step,
    and a PrefixCache of finished sequences' keys/values for prompts that repeat a prefix."""

    def __init__(self, model: Any, num_slots: int, context_length: int, prefix_cache_bytes: int):
        self.model = model
        # The time dimension doubles on demand up to the context (see SlotKVCache).
        self.cache = model.new_cache(min(context_length, 512), num_slots, context_length)
        self.prefix = PrefixCache(prefix_cache_bytes)

    def reuse_prefix(self, slot: int, ids: list[int]) -> int:
        """Load the longest cached prefix of `ids` into `slot` (at least one prompt token is
        left to prefill: its logits pick the first answer token). Returns its length."""
        import torch

        if not self.prefix.enabled:
            return 0
        blocks = self.prefix.match(ids, len(ids) - 1)
        if not blocks:
            return 0
        self.cache.write_prefix(slot, torch.cat([block.kv for block in blocks], dim=3))
        return self.cache.lengths[slot]

    def remember(self, slot: int, ids: list[int]) -> None:
        """Offer what `slot` holds (the first tokens of `ids`) to the prefix cache."""
        held = min(self.cache.lengths[slot], len(ids))
        self.prefix.insert(ids[:held], lambda start, end: self.cache.read(slot, start, end))

    def prefill(self, slot: int, ids: list[int], start: int) -> Any:
        import torch

        assert self.cache.lengths[slot] == start, (self.cache.lengths[slot], start)
        tokens = torch.tensor([ids], device=self.model.inv_freq.device)
        return self.model(input_ids=tokens, past_key_values=self.cache, logits_to_keep=1, slot=slot).logits[:, -1]

    def prefill_many(self, chunks: list[tuple[int, list[int], int]]) -> Any:
        """Chunks (slot, ids, start) of several sequences in one ragged forward."""
        if len(chunks) == 1:
            return self.prefill(*chunks[0])
        for slot, _, start in chunks:
            assert self.cache.lengths[slot] == start, (self.cache.lengths[slot], start)
        return self.model.prefill_segments([(slot, ids) for slot, ids, _ in chunks], self.cache)

    def decode(self, slots: list[int], tokens: list[int]) -> Any:
        return self.model.decode_rows(tokens, self.cache, slots)

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        if self.cache.shrink():
            trim_heap()

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)


class SequentialRunner:
    """Any HF-style causal LM (transformers' implementations): a cache per sequence, and one
    forward per sequence per decode step."""

    def __init__(self, model: Any, num_slots: int, context_length: int):
        import inspect

        self.model = model
        self.caches: dict[int, Any] = {}
        # transformers >= 5.2x renamed `past_key_values` to `cache` (the old name warns).
        parameters = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def _cache(self, slot: int) -> Any:
        if slot not in self.caches:
            from transformers import DynamicCache

            self.caches[slot] = DynamicCache(config=self.model.config)
        return self.caches[slot]

    def prefill(self, slot: int, ids: list[int], start: int) -> Any:
        import torch

        tokens = torch.tensor([ids], device=next(self.model.parameters()).device)
        kwargs = {self.cache_arg: self._cache(slot)}
        return self.model(input_ids=tokens, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]

    def prefill_many(self, chunks: list[tuple[int, list[int], int]]) -> Any:
        import torch

        return torch.cat([self.prefill(*chunk) for chunk in chunks])

    def decode(self, slots: list[int], tokens: list[int]) -> Any:
        import torch

        device = next(self.model.parameters()).device
        rows = [
            self.model(input_ids=torch.tensor([[t]], device=device), use_cache=True, **{self.cache_arg: self.caches[s]}).logits[:, -1]
            for s, t in zip(slots, tokens)
        ]
        return torch.cat(rows)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    # No prefix cache: transformers' cache classes would need copying in and out per layer
    # type (sliding windows, hybrid caches); the native path covers the CPU serving case.
    def reuse_prefix(self, slot: int, ids: list[int]) -> int:
        return 0

    def remember(self, slot: int, ids: list[int]) -> None:
        pass


def make_runner(model: Any, num_slots: int, context_length: int, prefix_cache_bytes: int) -> Any:
    if hasattr(model, "decode_rows"):
        return NativeRunner(model, num_slots, context_length, prefix_cache_bytes)
    return SequentialRunner(model, num_slots, context_length)
