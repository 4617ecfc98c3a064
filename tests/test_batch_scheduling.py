"""Fair prefill (core/batch.py, issue 18 item 8): a long prompt being prefilled neither holds back
a short prompt that arrives after it nor stops the running streams, its chunks get shorter deep
into the prompt (the attention scores a chunk needs stay bounded), and the KV cache it grew is
given back when it leaves. Counted in engine steps, never timed."""

from __future__ import annotations

import pytest
import torch
from batch_helpers import batch_one, collect, run_to_end

from vicuna_cli.core.batch import PREFILL_DEPTH_SCALE, BatchEngine, chunk_length
from vicuna_cli.core.generate import SamplingParams


def long_prompt(loaded, length: int) -> list[int]:
    """`length` ordinary token ids (no special ones), deterministic."""
    vocab = len(loaded.tokenizer)
    return [loaded.tokenizer.bos_token_id] + [10 + (i * 37) % (vocab - 20) for i in range(length - 1)]


def steps_to_first_token(engine: BatchEngine, request, limit: int) -> int:
    for step in range(1, limit + 1):
        engine.step()
        if request.drain():
            return step
    raise AssertionError(f"no first token within {limit} steps")


@pytest.mark.parametrize("long_length", [120, 240])
def test_a_short_prompt_behind_a_long_one_answers_within_two_steps_and_streams_keep_decoding(sp_native, long_length):
    """FIFO prefill gave the long prompt the whole budget every step: a short prompt waited for
    all of it (long_length / 16 steps) and so did its first token. Now: at most 2 steps (one
    when the long prompt was not passed over in the step before), whatever the long length."""
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=4, prefill_chunk=16, max_queue=256)
    encode = lambda text: sp_native.tokenizer(text)["input_ids"]  # noqa: E731
    stream = engine.submit(encode("The capital"), SamplingParams(temperature=0, max_new_tokens=200))
    engine.step()
    assert stream.drain() and stream.pending is not None  # decoding from here on
    long_ids = long_prompt(sp_native, long_length)
    long = engine.submit(long_ids, SamplingParams(temperature=0, max_new_tokens=4))
    short = engine.submit(encode("USER: hi"), SamplingParams(temperature=0, max_new_tokens=4))
    assert steps_to_first_token(engine, short, 2) == 1
    assert long.passed_over and long.prefilled == 0
    late = engine.submit(encode("Hello there"), SamplingParams(temperature=0, max_new_tokens=4))
    assert steps_to_first_token(engine, late, 2) == 2  # the long prompt's turn first, then this one
    assert 0 < long.prefilled < len(long_ids)  # the long one was still being prefilled meanwhile
    stream.drain()

    steps = 0
    while long.prefilled < len(long_ids):
        before = long.prefilled
        engine.step()
        steps += 1
        assert long.prefilled > before  # the long prompt progresses every step
        events = stream.drain()
        assert len(events) == 1 and len(events[0].token_ids) == 1  # one token per step, every step
    assert steps > 2
    run_to_end(engine)
    assert collect(long) == batch_one(sp_native, long_ids, SamplingParams(temperature=0, max_new_tokens=4))


def test_decoding_rows_come_out_of_the_step_budget(sp_native, monkeypatch):
    """With 3 streams decoding and a budget of 16, the long prompt's 16-token chunk does not fit
    beside a 5-token prompt: that step prefills only the short one."""
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=6, prefill_chunk=16, max_queue=256)
    chunks: list[list[int]] = []
    prefill_many = engine.runner.prefill_many
    monkeypatch.setattr(engine.runner, "prefill_many", lambda batch: chunks.append([len(c) for _, c, _ in batch]) or prefill_many(batch))
    params = SamplingParams(temperature=0, max_new_tokens=50)
    streams = [engine.submit(long_prompt(sp_native, 4), params) for _ in range(3)]
    engine.step()
    assert all(s.pending is not None for s in streams)
    long = engine.submit(long_prompt(sp_native, 100), params)
    engine.step()
    assert chunks[-1] == [16]  # alone, the first chunk of a step always goes (over budget)
    short = engine.submit(long_prompt(sp_native, 5), params)
    engine.step()
    assert chunks[-1] == [5] and short.pending is not None and long.prefilled == 16


def test_chunks_shorten_with_depth_so_attention_scores_stay_bounded(sp_native, monkeypatch):
    """A fixed 256-token chunk at position 8,000 computes 256 x 8,256 attention scores per head
    and layer (the worker grew from 1.87 to 4.3 GB): a chunk's query x key area stays within
    what a full chunk has at position PREFILL_DEPTH_SCALE."""
    chunk = 128
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, context_length=4096, max_batch_size=2, prefill_chunk=chunk, max_queue=256)
    areas: list[int] = []
    prefill_many = engine.runner.prefill_many
    monkeypatch.setattr(engine.runner, "prefill_many", lambda batch: areas.extend(len(c) * (start + len(c)) for _, c, start in batch) or prefill_many(batch))
    ids = long_prompt(sp_native, 3000)
    request = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=1))
    run_to_end(engine)
    assert request.stats.finish_reason == "length" and request.prefilled == len(ids)
    assert max(areas) <= chunk * (PREFILL_DEPTH_SCALE + chunk), max(areas)
    assert chunk_length(chunk, 0) == chunk and chunk_length(chunk, 3000) < chunk


def test_the_kv_cache_shrinks_back_after_a_long_sequence_leaves(sp_native):
    """Every slot's buffers double up to the longest sequence; they used to stay at that size."""
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, context_length=4096, max_batch_size=3, prefill_chunk=256, max_queue=256)
    cache = engine.runner.cache
    stream = engine.submit(long_prompt(sp_native, 6), SamplingParams(temperature=0, max_new_tokens=400))
    long = engine.submit(long_prompt(sp_native, 2000), SamplingParams(temperature=0, max_new_tokens=1))
    grew_to = 0
    while not long.finished:
        engine.step()
        grew_to = max(grew_to, cache.keys[0].shape[2])
    assert grew_to >= 2000
    engine.step()
    assert not stream.finished and cache.lengths[stream.slot] < cache.capacity
    assert cache.keys[0].shape[2] == cache.capacity
    stream.cancel()
    run_to_end(engine)


def test_swap_and_shrink_keep_every_sequence(sp_native):
    cache = sp_native.model.new_cache(16, num_slots=3, max_capacity=256)
    k = torch.arange(3 * 2 * 100 * 4, dtype=torch.float32).view(3, 2, 100, 4)
    for slot, n in ((0, 100), (1, 7), (2, 3)):
        for layer in range(len(cache.keys)):
            cache.write_chunk(layer, slot, k[slot : slot + 1, :, :n], -k[slot : slot + 1, :, :n], 0)
        cache.lengths[slot] = n
    cache.swap(0, 2)
    assert cache.lengths == [3, 7, 100]
    assert torch.equal(cache.keys[0][2, :, :100], k[0]) and torch.equal(cache.values[0][0, :, :3], -k[2, :, :3])
    assert not cache.shrink()  # the 100-token sequence still needs the room
    cache.lengths[2] = 0
    assert cache.shrink() and cache.keys[0].shape[2] == 16
    assert torch.equal(cache.keys[0][1, :, :7], k[1, :, :7]) and torch.equal(cache.keys[0][0, :, :3], k[2, :, :3])
