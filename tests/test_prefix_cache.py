"""Prefix caching (core/prefix_cache.py and its use by the batch engine): matching whole blocks
after exactly the same preceding tokens, the memory bound, and answers equal to uncached ones."""

from __future__ import annotations

import pytest
import torch

from vicuna_cli.core.batch import BatchEngine
from vicuna_cli.core.generate import Engine, SamplingParams
from vicuna_cli.core.prefix_cache import BLOCK, PrefixCache

LAYERS, HEADS, DIM = 2, 1, 2


def positions_kv(ids: list[int]):
    """A fake read_kv whose values say which token sat at which position."""

    def read(start: int, end: int) -> torch.Tensor:
        kv = torch.zeros(LAYERS, 2, HEADS, end - start, DIM)
        kv[..., 0] = torch.tensor(ids[start:end], dtype=torch.float32)
        kv[..., 1] = torch.arange(start, end, dtype=torch.float32)
        return kv

    return read


def stored(blocks) -> list[tuple[int, int]]:
    """(token, position) pairs of the matched blocks, in order."""
    kv = torch.cat([b.kv for b in blocks], dim=3)
    return [(int(t), int(p)) for t, p in kv[0, 0, 0].tolist()]


def block_bytes() -> int:
    return LAYERS * 2 * HEADS * BLOCK * DIM * 4


def test_match_returns_the_longest_whole_block_prefix_up_to_the_limit():
    cache = PrefixCache(10**6)
    first = list(range(100, 100 + 3 * BLOCK + 5))  # three whole blocks and a partial one
    cache.insert(first, positions_kv(first))
    assert len(cache.blocks) == 3
    other = first[: 2 * BLOCK] + [7] * BLOCK  # shares two blocks, then differs
    blocks = cache.match(other, len(other))
    assert stored(blocks) == list(zip(first[: 2 * BLOCK], range(2 * BLOCK)))
    # The limit keeps the last prompt token out of the cache (it must be prefilled for logits).
    assert len(cache.match(first[: 2 * BLOCK], 2 * BLOCK - 1)) == 1
    assert cache.match([1] + first, len(first) + 1) == []  # same tokens at other positions


def test_a_block_matches_only_after_the_same_preceding_tokens():
    cache = PrefixCache(10**6)
    a = [1] * BLOCK + [5] * BLOCK
    b = [2] * BLOCK + [5] * BLOCK  # the same second block after a different first one
    cache.insert(a, positions_kv(a))
    assert len(cache.match(b, len(b))) == 0
    cache.insert(b, positions_kv(b))
    assert stored(cache.match(b, len(b))) == list(zip(b, range(2 * BLOCK)))
    assert stored(cache.match(a, len(a))) == list(zip(a, range(2 * BLOCK)))


def test_inserting_a_known_prefix_stores_only_the_new_blocks():
    cache = PrefixCache(10**6)
    a = list(range(2 * BLOCK))
    cache.insert(a, positions_kv(a))
    reads = []

    def counting(start, end):
        reads.append((start, end))
        return positions_kv(a + [9] * BLOCK)(start, end)

    cache.insert(a + [9] * BLOCK, counting)
    assert reads == [(2 * BLOCK, 3 * BLOCK)]
    assert len(cache.blocks) == 3 and cache.bytes == 3 * block_bytes()


def test_memory_bound_evicts_least_recently_used_sequence_ends_first():
    cache = PrefixCache(4 * block_bytes())
    a = [1] * (2 * BLOCK) + [2] * BLOCK  # 3 blocks
    b = [3] * (2 * BLOCK)  # 2 blocks: 5 > 4, so a's last block (its least recent) goes
    cache.insert(a, positions_kv(a))
    cache.insert(b, positions_kv(b))
    assert cache.bytes <= cache.max_bytes and len(cache.blocks) == 4
    assert len(cache.match(a, len(a))) == 2  # a lost its end, kept its start
    assert len(cache.match(b, len(b))) == 2
    # Touching a makes b the least recent: a new sequence evicts b's end first.
    cache.match(a, len(a))
    c = [4] * BLOCK
    cache.insert(c, positions_kv(c))
    assert len(cache.match(b, len(b))) == 1 and len(cache.match(a, len(a))) == 2


def test_dropping_a_block_drops_its_descendants_and_zero_bytes_disables():
    cache = PrefixCache(10**6)
    a = list(range(3 * BLOCK))
    cache.insert(a, positions_kv(a))
    root = next(k for k in cache.blocks if k[0] == 0)
    cache._drop(root)
    assert cache.blocks == {} and cache.bytes == 0
    off = PrefixCache(0)
    off.insert(a, positions_kv(a))
    assert not off.enabled and off.blocks == {}


def greedy_ids(engine: BatchEngine, ids: list[int], max_new_tokens: int = 12):
    request = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    for _ in range(500):
        if not engine.step():
            break
    events = request.drain()
    return [t for e in events for t in e.token_ids], request.stats


@pytest.mark.parametrize("which", ["sp_native", "bpe_native"])
def test_reused_prefix_gives_the_answer_of_an_uncached_run(which, request):
    loaded = request.getfixturevalue(which)
    encode = lambda text: loaded.tokenizer(text)["input_ids"]  # noqa: E731
    system = "A chat between a curious user and an assistant. The assistant answers politely. "
    prompts = [encode(system + q) for q in ("USER: hello ASSISTANT:", "USER: what is two plus two? ASSISTANT:")]
    uncached = BatchEngine(loaded.model, loaded.tokenizer, loaded.context_length, prefix_cache_bytes=0, prefill_chunk=8, max_batch_size=16, max_queue=256)
    cached = BatchEngine(loaded.model, loaded.tokenizer, loaded.context_length, prefill_chunk=8, max_batch_size=16, max_queue=256)
    expected = [greedy_ids(uncached, p)[0] for p in prompts]
    first, stats0 = greedy_ids(cached, prompts[0])
    second, stats1 = greedy_ids(cached, prompts[1])
    shared = next(i for i, (x, y) in enumerate(zip(*prompts)) if x != y)
    assert stats0.cached_tokens == 0
    assert stats1.cached_tokens == (shared // BLOCK) * BLOCK > 0
    assert [first, second] == expected
    # A follow-up turn repeats prompt + answer: the cache covers beyond the first prompt.
    follow = prompts[1] + second + encode(" USER: and three? ASSISTANT:")
    third, stats2 = greedy_ids(cached, follow)
    assert stats2.cached_tokens > len(prompts[1])
    assert third == greedy_ids(uncached, follow)[0]


def test_chat_engine_reuses_the_conversation_so_far(sp_native):
    engine = Engine(sp_native.model, sp_native.tokenizer, sp_native.context_length)
    ids = sp_native.tokenizer("USER: tell me a story about a cat and a dog ASSISTANT:")["input_ids"]
    first = engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=10))
    "".join(first)
    again = engine.generate(ids + first.output_ids, SamplingParams(temperature=0, max_new_tokens=5))
    "".join(again)
    # Everything but the last token is eligible (it is fed to get the next token's logits).
    assert again.stats.cached_tokens == ((len(ids) + len(first.output_ids) - 1) // BLOCK) * BLOCK > 0
