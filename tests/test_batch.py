"""Continuous batching (core/batch.py): batched output equals batch-1 output, joins and leaves,
cancellation, queue limits, errors inside a step, logprobs, and the thread/asyncio interfaces."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from batch_helpers import batch_one, collect, run_to_end

from vicuna_cli.core.batch import BatchEngine
from vicuna_cli.core.batch_request import QueueFull
from vicuna_cli.core.runners import SequentialRunner
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.generate import ContextOverflow, InvalidParams, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Hello there, how are you? I am fine, thank you. The capital",
    "USER: hi",
    "def add(a, b):\n    return a + b\n",
    "안녕하세요 반갑습니다.",
]
GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


@pytest.mark.parametrize("which", ["sp_native", "bpe_native", "sp_loaded"])
def test_batched_greedy_equals_batch_one_with_staggered_arrivals(which, request):
    loaded = request.getfixturevalue(which)
    encode = lambda text: loaded.tokenizer(text)["input_ids"]  # noqa: E731
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (20, 7, 30, 12, 25)]
    expected = [batch_one(loaded, encode(p), sp) for p, sp in zip(PROMPTS, params)]
    engine = BatchEngine(loaded.model, loaded.tokenizer, loaded.context_length, max_batch_size=3, prefill_chunk=8, max_queue=256)
    assert engine.batched == (which != "sp_loaded")
    requests = [engine.submit(encode(PROMPTS[0]), params[0]), engine.submit(encode(PROMPTS[1]), params[1])]
    for _ in range(3):  # the first two are decoding when the others arrive
        engine.step()
    requests += [engine.submit(encode(p), sp) for p, sp in zip(PROMPTS[2:], params[2:])]
    assert engine.num_running == 2 and engine.num_waiting == 3
    engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 2  # a slot limit of 3
    run_to_end(engine)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert [collect(r) for r in requests] == expected
    assert {r.stats.finish_reason for r in requests} == {"length"} or any(e[2] == "stop" for e in expected)


@pytest.mark.parametrize("which", ["sp_native", "bpe_native"])
def test_running_sequences_stay_in_the_lowest_slots_and_answers_do_not_change(which, request, monkeypatch):
    """Sequences in low slots finish first; the others move down, so every decode step's rows are
    consecutive slots, one slice of the cache (no gather), and each answer is what it is alone."""
    loaded = request.getfixturevalue(which)
    encode = lambda text: loaded.tokenizer(text)["input_ids"]  # noqa: E731
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (3, 6, 40, 9, 30)]
    expected = [batch_one(loaded, encode(p), sp) for p, sp in zip(PROMPTS, params)]
    engine = BatchEngine(loaded.model, loaded.tokenizer, loaded.context_length, max_batch_size=5, prefill_chunk=8, max_queue=256)
    decoded_slots, moves = [], []
    decode, move = engine.runner.decode, engine.runner.move
    monkeypatch.setattr(engine.runner, "decode", lambda slots, tokens: decoded_slots.append(list(slots)) or decode(slots, tokens))
    monkeypatch.setattr(engine.runner, "move", lambda src, dst: moves.append((src, dst)) or move(src, dst))
    requests = [engine.submit(encode(p), sp) for p, sp in zip(PROMPTS, params)]
    run_to_end(engine)
    assert [collect(r) for r in requests] == expected
    assert moves and all(dst < src for src, dst in moves)
    assert all(slots == list(range(slots[0], slots[0] + len(slots))) for slots in decoded_slots), decoded_slots


def test_chunked_prefill_gives_the_same_answer(sp_native):
    ids = sp_native.tokenizer(PROMPTS[1])["input_ids"]
    outputs = []
    for chunk in (3, 4096):
        engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, prefill_chunk=chunk, max_batch_size=16, max_queue=256)
        request = engine.submit(ids, GREEDY)
        run_to_end(engine)
        outputs.append(collect(request))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0]) == 20


def test_seeded_sampling_does_not_depend_on_the_batch(bpe_native):
    encode = lambda text: bpe_native.tokenizer(text)["input_ids"]  # noqa: E731
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=25, seed=1234)
    alone = batch_one(bpe_native, encode(PROMPTS[0]), params)
    engine = BatchEngine(bpe_native.model, bpe_native.tokenizer, bpe_native.context_length, max_batch_size=4, max_queue=256)
    others = [engine.submit(encode(p), SamplingParams(temperature=1.0, max_new_tokens=25, seed=i)) for i, p in enumerate(PROMPTS[1:3])]
    engine.step()
    mine = engine.submit(encode(PROMPTS[0]), params)
    run_to_end(engine)
    assert collect(mine) == alone
    assert all(collect(o)[2] in ("stop", "length") for o in others)


def test_stop_strings_and_stop_token_ids_per_request(sp_native):
    ids = sp_native.tokenizer(PROMPTS[0])["input_ids"]
    free_ids, free_text, _ = batch_one(sp_native, ids, GREEDY)
    assert len(free_text) > 8
    stop = free_text[4:7]
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=16, max_queue=256)
    by_string = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=20, stop=[stop]))
    by_token = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[free_ids[5]]))
    plain = engine.submit(ids, GREEDY)
    run_to_end(engine)
    assert collect(by_string)[1:] == (free_text[: free_text.find(stop)], "stop")
    token_ids, _, reason = collect(by_token)
    assert (token_ids, reason) == (free_ids[: free_ids.index(free_ids[5])], "stop")
    assert collect(plain) == (free_ids, free_text, "length")
    assert plain.stats.completion_tokens == 20 and plain.stats.prompt_tokens == len(ids)
    assert 0 < plain.stats.ttft <= plain.stats.total_time


def test_cancel_frees_the_slot_at_once(sp_native):
    ids = sp_native.tokenizer(PROMPTS[0])["input_ids"]
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=2, max_queue=256)
    long = SamplingParams(temperature=0, max_new_tokens=100)
    first, second, third = (engine.submit(ids, long) for _ in range(3))
    engine.step()
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    first.cancel()
    waiting_cancelled = engine.submit(ids, long)
    waiting_cancelled.cancel()
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 0)  # third took the freed slot
    assert (second.slot, third.slot) == (0, 1)  # second moved down into slot 0 (see _compact)
    events = first.drain()
    assert events[-1].finish_reason == "cancelled" and first.stats.finish_reason == "cancelled"
    assert 1 <= first.stats.completion_tokens <= 3
    assert [e.finish_reason for e in waiting_cancelled.drain()] == ["cancelled"]
    assert waiting_cancelled.stats.completion_tokens == 0
    engine.stop()
    assert second.drain()[-1].finish_reason == "cancelled" and third.drain()[-1].finish_reason == "cancelled"
    with pytest.raises(VicunaError, match="shutting down"):
        engine.submit(ids, GREEDY)


def test_queue_limit_and_prompt_checks(sp_native):
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=2, max_queue=3)
    for _ in range(5):
        engine.submit([1, 5, 6], GREEDY)
    with pytest.raises(QueueFull) as info:
        engine.submit([1, 5, 6], GREEDY)
    assert isinstance(info.value, VicunaError) and "queue is full (3 waiting)" in info.value.message
    assert info.value.hint
    with pytest.raises(ContextOverflow):
        engine.submit(list(range(5, 5 + sp_native.context_length)), GREEDY)
    with pytest.raises(VicunaError, match="prompt is empty"):
        engine.submit([], GREEDY)
    assert engine.num_waiting == 5


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(stop=[1]), "stop"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_sampling_params_are_named(kwargs, param):
    with pytest.raises(InvalidParams) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert info.value.message.startswith(f"{param}: ")
    assert info.value.hint


def test_an_error_inside_a_step_fails_only_the_affected_requests(sp_native, monkeypatch):
    ids = sp_native.tokenizer(PROMPTS[0])["input_ids"]
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=16, max_queue=256)
    real_prefill = engine.runner.prefill

    def flaky_prefill(slot, chunk, start):  # the second request breaks the model
        if slot == bad.slot:
            raise RuntimeError("boom in prefill")
        return real_prefill(slot, chunk, start)

    def ragged_breaks(chunks, cache):
        raise RuntimeError("boom in the ragged prefill")

    monkeypatch.setattr(engine.runner, "prefill", flaky_prefill)
    monkeypatch.setattr(engine.runner.model, "prefill_segments", ragged_breaks)
    ok, bad = engine.submit(ids, GREEDY), engine.submit(ids, GREEDY)
    engine.step()  # the ragged forward of both fails; retried alone, only the second one fails
    assert ok.exception is None and ok.prefilled == len(ids)
    last = bad.drain()[-1]
    assert (last.finish_reason, last.error) == ("error", "boom in prefill")
    assert isinstance(bad.exception, RuntimeError) and bad.slot is None
    real_decode = engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda slots, tokens: (_ for _ in ()).throw(ValueError("decode broke")))
    engine.step()
    assert ok.drain()[-1].error == "decode broke"
    assert engine.num_running == 0
    monkeypatch.setattr(engine.runner, "decode", real_decode)
    again = engine.submit(ids, GREEDY)  # the engine keeps serving
    run_to_end(engine)
    assert collect(again) == batch_one(sp_native, ids, GREEDY)


def test_logprobs_are_the_models_distribution(bpe_native):
    tok = bpe_native.tokenizer
    ids = tok(PROMPTS[3])["input_ids"]
    engine = BatchEngine(bpe_native.model, tok, bpe_native.context_length, max_batch_size=16, max_queue=256)
    request = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=8, logprobs=True, top_logprobs=5))
    bare = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=8))
    run_to_end(engine)
    events = request.drain()
    entries = [lp for e in events for lp in (e.logprobs or [])]
    out = [t for e in events for t in e.token_ids]
    assert [e.token_id for e in entries] == out and len(out) == 8
    assert all(e.logprobs is None for e in bare.drain())
    with torch.inference_mode():
        full = bpe_native.model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0].float()
    reference = torch.log_softmax(full[len(ids) - 1 : -1], dim=-1)
    for i, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(reference[i, out[i]]), abs=1e-4)
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token_id == out[i]  # greedy: the chosen token is the most likely
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert not entry.top_logprobs[0].top_logprobs
    # The tokens' bytes are the answer's bytes (a random model may emit invalid UTF-8: compare
    # with the tokenizer's own lossy decoding).
    raw = bytes(b for e in entries for b in e.bytes)
    assert raw.decode("utf-8", errors="replace") == tok.decode(out)


def test_token_pieces_bytes_for_sentencepiece(sp_native):
    from vicuna_cli.core.generate import TokenPieces

    tok = sp_native.tokenizer
    ids = tok(" Hello 🙂", add_special_tokens=False)["input_ids"]
    pieces = TokenPieces(tok)
    raw = b"".join(bytes(pieces(i)[1]) for i in ids)
    assert raw.decode() == " Hello 🙂"  # byte-fallback pieces and "▁" spaces give the exact bytes


def test_penalties_change_the_greedy_answer(sp_native):
    ids = sp_native.tokenizer(PROMPTS[1])["input_ids"]
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=16, max_queue=256)
    params = dict(temperature=0, max_new_tokens=30)
    plain = engine.submit(ids, SamplingParams(**params))
    frequency = engine.submit(ids, SamplingParams(**params, frequency_penalty=2.0))
    presence = engine.submit(ids, SamplingParams(**params, presence_penalty=2.0))
    run_to_end(engine)
    plain_ids, freq_ids, pres_ids = (collect(r)[0] for r in (plain, frequency, presence))
    assert max(plain_ids.count(t) for t in plain_ids) > 2  # the tiny model repeats itself
    assert freq_ids != plain_ids and pres_ids != plain_ids
    assert len(set(pres_ids)) > len(set(plain_ids))


def test_thread_and_blocking_events(bpe_native):
    tok = bpe_native.tokenizer
    encode = lambda text: tok(text)["input_ids"]  # noqa: E731
    expected = [batch_one(bpe_native, encode(p), GREEDY) for p in PROMPTS[:4]]
    engine = BatchEngine(bpe_native.model, tok, bpe_native.context_length, max_batch_size=2, max_queue=256)
    engine.start()
    engine.start()  # idempotent
    results: dict[int, tuple] = {}

    def client(i: int) -> None:
        request = engine.submit(encode(PROMPTS[i]), GREEDY)
        events = list(request.events(timeout=30))
        results[i] = ([t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.stop()
    assert [results[i] for i in range(4)] == expected
    assert engine._thread is None


def test_asyncio_events_and_stop_cancels(bpe_native):
    tok = bpe_native.tokenizer
    ids = tok(PROMPTS[0])["input_ids"]
    expected = batch_one(bpe_native, ids, GREEDY)
    engine = BatchEngine(bpe_native.model, tok, bpe_native.context_length, max_batch_size=16, max_queue=256)
    engine.start()

    async def main():
        async def one():
            request = engine.submit(ids, GREEDY)
            events = [e async for e in request.aevents()]
            return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason

        return await asyncio.wait_for(asyncio.gather(one(), one(), one()), timeout=60)

    try:
        assert asyncio.run(main()) == [expected] * 3
        endless = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=200))
        stream = endless.events(timeout=30)
        next(stream)
    finally:
        engine.stop(cancel_running=True)
    assert [e.finish_reason for e in stream][-1] == "cancelled"


def test_stop_without_cancelling_lets_requests_finish(sp_native):
    ids = sp_native.tokenizer(PROMPTS[0])["input_ids"]
    engine = BatchEngine(sp_native.model, sp_native.tokenizer, sp_native.context_length, max_batch_size=16, max_queue=256)
    engine.start()
    requests = [engine.submit(ids, GREEDY) for _ in range(3)]
    engine.stop(cancel_running=False)
    assert [list(r.events(timeout=1))[-1].finish_reason for r in requests] == ["length"] * 3


def test_transformers_models_run_one_request_per_step(sp_loaded):
    engine = BatchEngine(sp_loaded.model, sp_loaded.tokenizer, sp_loaded.context_length, max_batch_size=16, max_queue=256)
    assert isinstance(engine.runner, SequentialRunner) and not engine.batched


@pytest.mark.slow
def test_embedded_model_batched_equals_batch_one(embedded_model_home, monkeypatch):
    """The real SmolLM2 in fp32: each request of a staggered batch gets its batch-1 tokens."""
    from vicuna_cli.core import models
    from vicuna_cli.core.templates import ChatTemplate

    monkeypatch.setenv("VICUNA_HOME", str(embedded_model_home))
    lm = models.load(None, dtype="float32", implementation="native", progress=False)
    template = ChatTemplate(lm.tokenizer)
    questions = ["Name three colours.", "What is the capital of France? Answer in one sentence.",
                 "Write a haiku about the sea.", "Explain what a CPU does, briefly, for a child of ten."]
    prompts = [lm.tokenizer(template.render([{"role": "user", "content": q}]).text, add_special_tokens=False)["input_ids"]
               for q in questions]
    params = SamplingParams(temperature=0, max_new_tokens=32)
    expected = [batch_one(lm, p, params) for p in prompts]
    engine = BatchEngine(lm.model, lm.tokenizer, lm.context_length, max_batch_size=4, max_queue=256)
    requests = [engine.submit(prompts[0], params)]
    for prompt in prompts[1:]:
        for _ in range(3):
            engine.step()
        requests.append(engine.submit(prompt, params))
    run_to_end(engine)
    assert [collect(r) for r in requests] == expected


@pytest.mark.parametrize("which", ["sp_native", "sp_loaded"])
def test_steps_build_no_autograd_graph(which, request):
    """A graph would chain every step's activations to the KV cache (in-place writes), and the
    worker grew by ~20 MB per decode step until the machine swapped."""
    loaded = request.getfixturevalue(which)
    engine = BatchEngine(loaded.model, loaded.tokenizer, loaded.context_length, max_batch_size=2, max_queue=256)
    seen = []
    real_decode = engine.runner.decode

    def recording_decode(slots, tokens):
        logits = real_decode(slots, tokens)
        seen.append(logits.requires_grad or logits.grad_fn is not None)
        if which == "sp_native":
            keys = [k for k in engine.runner.cache.keys if k is not None]
            seen.extend(k.requires_grad or k.grad_fn is not None for k in keys)
        return logits

    engine.runner.decode = recording_decode
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
    engine.submit(ids, GREEDY), engine.submit(ids, GREEDY)
    run_to_end(engine)
    assert seen and not any(seen)
