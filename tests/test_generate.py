"""The generation engine: stops, UTF-8 streaming, sampling, cancellation and stats."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from vicuna_cli.core.generate import (
    ContextOverflow,
    Engine,
    IncrementalDetokenizer,
    SamplingParams,
    StopStringFilter,
)

MULTIBYTE = "안녕하세요 반갑습니다. 你好世界。 🙂🎉🚀 café 𝄞 ಠ_ಠ 😀 훈민정음"
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def engine_for(loaded) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, loaded.context_length)


# -- stop strings -----------------------------------------------------------------------------


def feed_all(stops, deltas):
    f = StopStringFilter(stops)
    out = "".join(f.feed(d) for d in deltas)
    return out + f.flush(), f.stopped


def test_stop_string_split_across_deltas_is_cut_and_never_shown():
    assert feed_all(["</s>"], ["Hello", " world<", "/", "s>", "more"]) == ("Hello world", True)
    assert feed_all(["USER:"], ["The answer.", " US", "ER:", " next"]) == ("The answer. ", True)


def test_text_that_only_looked_like_a_stop_is_released():
    assert feed_all(["</s>"], ["a <", "/b>", " c"]) == ("a </b> c", False)
    assert feed_all(["\n### Human:"], ["x\n###", " Heading"]) == ("x\n### Heading", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["USER:", "</s>"], ["one</s>two USER: three"]) == ("one", True)


def test_held_back_text_is_not_emitted_early():
    f = StopStringFilter(["</s>"])
    assert f.feed("abc</") == "abc"
    assert f.feed("s") == ""
    assert f.feed(">") == ""
    assert f.stopped


# -- UTF-8-safe incremental detokenizing ---------------------------------------------------------


@pytest.mark.parametrize("which", ["sp_loaded", "bpe_loaded"])
def test_incremental_detokenizer_never_emits_broken_characters(which, request):
    tokenizer = request.getfixturevalue(which).tokenizer
    text = f"Hello {MULTIBYTE} and Paris."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The multibyte text really is split into byte pieces by both tokenizers.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_keeps_sentencepiece_spaces(sp_loaded):
    tokenizer = sp_loaded.tokenizer
    prompt = tokenizer("USER: hi ASSISTANT:")["input_ids"]
    answer = tokenizer(" Hello there, how are you?", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.push(i) for i in answer) + detok.flush()
    assert text.strip() == "Hello there, how are you?"
    assert "Hello there," in text


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM whose next token is read from a script, to drive the engine's
    streaming path with exact token sequences (multi-byte pieces, stop strings, EOS)."""

    def __init__(self, script: list[int], vocab_size: int, config):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.config = config
        self.generation_config = SimpleNamespace(eos_token_id=config.eos_token_id)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full((1, input_ids.shape[1], self.vocab_size), -1e9)
        logits[0, -1, token] = 0.0
        return SimpleNamespace(logits=logits)


def scripted_engine(loaded, text: str, eos: bool = True) -> Engine:
    tokenizer = loaded.tokenizer
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    if eos:
        script = script + [tokenizer.eos_token_id]
    model = ScriptedModel(script, len(tokenizer), loaded.model.config)
    return Engine(model, tokenizer, 256)


@pytest.mark.parametrize("which", ["sp_loaded", "bpe_loaded"])
def test_engine_streams_multibyte_text_whole(which, request):
    loaded = request.getfixturevalue(which)
    engine = scripted_engine(loaded, MULTIBYTE)
    generation = engine.generate(engine.encode("Hi"), GREEDY.__class__(temperature=0, max_new_tokens=200))
    deltas = list(generation)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas).strip() == MULTIBYTE
    assert generation.stats.finish_reason == "stop"  # ended by the EOS token
    assert len(deltas) > 5  # streamed, not delivered at the end


@pytest.mark.parametrize("which", ["sp_loaded", "bpe_loaded"])
def test_engine_stop_string_split_across_tokens(which, request):
    loaded = request.getfixturevalue(which)
    text = "The capital of France is Paris. USER: and more"
    engine = scripted_engine(loaded, text, eos=False)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [loaded.tokenizer.decode([i]) for i in ids]
    assert "USER:" not in pieces and " USER:" not in pieces  # the stop really spans several tokens
    generation = engine.generate(engine.encode("Hi"), SamplingParams(temperature=0, max_new_tokens=100, stop=("</s>", "USER:")))
    out = "".join(generation)
    assert out.strip() == "The capital of France is Paris."
    assert generation.stats.finish_reason == "stop"


def test_engine_cuts_a_stop_that_falls_inside_one_token(sp_loaded):
    loaded = sp_loaded
    engine = engine_for(loaded)
    free = engine.generate(engine.encode("Hello there"), GREEDY)
    text = "".join(free)
    assert len(text) > 6
    stop = text[3:6]  # a stop string that starts mid-token in the model's own greedy output
    stopped = engine.generate(engine.encode("Hello there"), SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))
    out = "".join(stopped)
    assert out == text[: text.find(stop)]
    assert stop not in out
    assert stopped.stats.finish_reason == "stop"


# -- sampling, equivalence with transformers, stats -----------------------------------------------


@pytest.mark.parametrize("which, engine_model", [
    ("sp_loaded", "sp_loaded"), ("bpe_loaded", "bpe_loaded"),  # the engine over transformers' model
    ("sp_loaded", "sp_native"), ("bpe_loaded", "bpe_native"),  # the engine over the native model
])
def test_greedy_matches_model_generate(which, engine_model, request):
    loaded = request.getfixturevalue(which)
    engine = engine_for(request.getfixturevalue(engine_model))
    prompt = engine.encode("The capital of France is")
    generation = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=20))
    list(generation)
    with torch.inference_mode():
        reference = loaded.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=loaded.tokenizer.eos_token_id,
        )[0, len(prompt):].tolist()
    eos = engine.stop_token_ids
    expected = []
    for token in reference:
        if token in eos:
            break
        expected.append(token)
    assert generation.output_ids == expected


def test_seed_makes_sampling_reproducible(sp_loaded):
    engine = engine_for(sp_loaded)
    prompt = engine.encode("Hello")
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=30, seed=7)
    first, second = engine.generate(prompt, params), engine.generate(prompt, params)
    list(first), list(second)
    assert first.output_ids == second.output_ids
    others = []
    for seed in (8, 9, 10):
        g = engine.generate(prompt, SamplingParams(temperature=1.0, max_new_tokens=30, seed=seed))
        list(g)
        others.append(g.output_ids)
    assert any(o != first.output_ids for o in others)


def test_top_k_one_is_greedy(bpe_loaded):
    engine = engine_for(bpe_loaded)
    prompt = engine.encode("Hello")
    greedy = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=15))
    topk = engine.generate(prompt, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=15, seed=3))
    list(greedy), list(topk)
    assert greedy.output_ids == topk.output_ids


def test_repetition_penalty_changes_the_output(sp_loaded):
    engine = engine_for(sp_loaded)
    prompt = engine.encode("Hello there, how are you?")
    plain = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=30))
    penalised = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=30, repetition_penalty=5.0))
    list(plain), list(penalised)
    assert plain.output_ids != penalised.output_ids
    assert len(set(penalised.output_ids)) >= len(set(plain.output_ids))


def test_max_new_tokens_and_stats(sp_loaded):
    engine = scripted_engine(sp_loaded, "word " * 100, eos=False)
    prompt = engine.encode("Hi there")
    generation = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=9))
    list(generation)
    stats = generation.stats
    assert stats.output_tokens == 9
    assert stats.prompt_tokens == len(prompt)
    assert stats.finish_reason == "length"
    assert 0 < stats.time_to_first_token <= stats.total_time
    assert stats.tokens_per_second > 0
    assert set(stats.as_dict()) >= {"prompt_tokens", "output_tokens", "time_to_first_token", "tokens_per_second"}


def test_cancel_stops_between_tokens(sp_loaded):
    engine = scripted_engine(sp_loaded, "word " * 100, eos=False)
    cancel = threading.Event()
    generation = engine.generate(engine.encode("Hi"), SamplingParams(temperature=0, max_new_tokens=100), cancel)
    received = []
    for delta in generation:
        received.append(delta)
        if len(received) == 3:
            cancel.set()
    assert generation.stats.finish_reason == "cancelled"
    assert generation.stats.output_tokens < 10


def test_closing_the_stream_counts_as_cancelled(sp_loaded):
    engine = scripted_engine(sp_loaded, "word " * 100, eos=False)
    generation = engine.generate(engine.encode("Hi"), SamplingParams(temperature=0, max_new_tokens=100))
    stream = iter(generation)
    next(stream)
    stream.close()
    assert generation.stats.finish_reason == "cancelled"
    assert generation.stats.output_tokens < 5


def test_prompt_longer_than_context_is_a_clear_error(sp_loaded):
    engine = engine_for(sp_loaded)
    with pytest.raises(ContextOverflow) as info:
        engine.generate(list(range(5, 5 + engine.context_length)), GREEDY)
    assert "context" in info.value.message
    assert info.value.prompt_tokens == engine.context_length


def test_answer_budget_is_clipped_to_the_context(sp_loaded):
    engine = scripted_engine(sp_loaded, "word " * 300, eos=False)
    prompt = [5] * (engine.context_length - 4)
    generation = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=100))
    list(generation)
    assert generation.stats.output_tokens == 4
    assert generation.stats.finish_reason == "length"
