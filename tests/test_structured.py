"""Structured output (core/structured.py): response_format as a grammar on the tiny random models.

The fixture models have random weights, so without the constraint their output is never JSON;
with it, it must parse and fit the schema, with either tokenizer (native SentencePiece pieces and
transformers' byte-level BPE)."""

from __future__ import annotations

import json
import sys

import pytest
from structured_formats import VERDICT_FORMAT, VERDICT_SCHEMA

from vicuna_cli.core import structured
from vicuna_cli.core.batch import BatchEngine
from vicuna_cli.core.generate import SamplingParams, eos_token_ids
from vicuna_cli.core.sampling import RequestSampler
from vicuna_cli.core.structured import ResponseFormatError, check_response_format, compile_response_format

# xgrammar comes with the serve extra (scripts/bootstrap.sh installs it): these tests need it, and
# fail rather than skip without it, so a broken install cannot pass unnoticed.

JSON_OBJECT = {"type": "json_object"}
LOADED = ["sp_native", "bpe_loaded"]  # the native tokenizer (SentencePiece) and a transformers one (byte-level BPE)


def grammar_for(loaded, response_format):
    model, tokenizer = loaded.model, loaded.tokenizer
    return compile_response_format(response_format, tokenizer, model.config.vocab_size, eos_token_ids(model, tokenizer))


def prompt_ids(loaded, text="Write the verdict as JSON:"):
    return list(loaded.tokenizer(text)["input_ids"])


def run(engine: BatchEngine, requests, limit: int = 3000):
    for _ in range(limit):
        if not engine.step():
            break
    out = []
    for request in requests:
        events = request.drain()
        out.append(("".join(e.text for e in events), events[-1].finish_reason, list(request.output_ids)))
    return out


def generate(loaded, params, text="Write the verdict as JSON:"):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=1, max_queue=256)
    (result,) = run(engine, [engine.submit(prompt_ids(loaded, text), params)])
    return result


def assert_verdict(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"verdict", "score"}, value
    assert value["verdict"] in ("A", "B", "tie")
    assert isinstance(value["score"], int) and not isinstance(value["score"], bool) and 1 <= value["score"] <= 10
    return value


def test_check_response_format_shapes():
    assert check_response_format(None) is None
    assert check_response_format({"type": "text"}) is None
    assert check_response_format(JSON_OBJECT) == {"type": "object"}
    assert check_response_format(VERDICT_FORMAT) == VERDICT_SCHEMA


@pytest.mark.parametrize(
    "value, message",
    [
        ("json", "must be an object with a 'type', got str"),
        ({"type": "xml"}, "type must be one of text, json_object, json_schema; got 'xml'"),
        ({}, "type must be one of text, json_object, json_schema; got None"),
        ({"type": "json_schema"}, "type json_schema needs a 'json_schema' object with 'name' and 'schema'"),
        ({"type": "json_schema", "json_schema": {"schema": VERDICT_SCHEMA}}, "json_schema.name must be a non-empty string"),
        ({"type": "json_schema", "json_schema": {"name": "v"}}, "json_schema.schema must be a JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"name": "v", "schema": [1]}}, "json_schema.schema must be a JSON Schema object"),
    ],
)
def test_bad_response_formats_are_named(value, message):
    with pytest.raises(ResponseFormatError) as info:
        check_response_format(value)
    assert info.value.message == f"response_format: {message}"
    assert info.value.param == "response_format"


def test_a_schema_that_does_not_compile_is_a_response_format_error(bpe_loaded):
    bad = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}
    with pytest.raises(ResponseFormatError) as info:
        grammar_for(bpe_loaded, bad)
    assert info.value.message == "response_format: the JSON schema cannot be compiled: Invalid range: minimum greater than maximum"
    bad["json_schema"]["schema"] = {"type": "nonsense"}
    with pytest.raises(ResponseFormatError, match='Unsupported type "nonsense"'):
        grammar_for(bpe_loaded, bad)


def test_without_xgrammar_the_error_says_what_to_install(bpe_loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import fails as if not installed
    monkeypatch.setattr(structured, "_vocabularies", {})
    with pytest.raises(ResponseFormatError) as info:
        grammar_for(bpe_loaded, JSON_OBJECT)
    assert info.value.message.startswith("response_format: json_object/json_schema need the optional package 'xgrammar', which is not installed")
    assert info.value.hint.startswith("pip install 'vicuna-cli[serve]'")
    assert grammar_for(bpe_loaded, {"type": "text"}) is None  # text needs no library


def test_token_bytes_from_both_tokenizers(sp_native, bpe_loaded):
    sp = structured.token_bytes(sp_native.tokenizer, sp_native.model.config.vocab_size)
    assert sp[1] == sp[2] == b""  # <s>, </s>: special, never allowed inside JSON
    assert sp[sp_native.tokenizer._tok.token_to_id("<0x7B>")] == b"{"  # byte fallback
    assert sp[sp_native.tokenizer._tok.token_to_id("\u2581you")] == b" you"
    bpe = structured.token_bytes(bpe_loaded.tokenizer, bpe_loaded.model.config.vocab_size + 3)
    assert bpe[bpe_loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")] == b""
    assert bpe[bpe_loaded.tokenizer.convert_tokens_to_ids("\u0120you")] == b" you"  # byte-level alphabet
    assert bpe[-3:] == [b"", b"", b""]  # padded lm_head rows


def test_identical_schemas_compile_once(bpe_loaded):
    first = grammar_for(bpe_loaded, VERDICT_FORMAT)
    vocab = first.vocab
    compiles = vocab.compiles
    for _ in range(160):  # a judge run: one schema per question
        again = grammar_for(bpe_loaded, json.loads(json.dumps(VERDICT_FORMAT)))
    assert again is first and vocab.compiles == compiles


def test_the_grammar_cache_is_bounded(bpe_loaded, monkeypatch):
    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMARS", 2)
    vocab = grammar_for(bpe_loaded, JSON_OBJECT).vocab
    vocab.grammars.clear()
    formats = [{"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": [i]}}} for i in range(3)]
    first = grammar_for(bpe_loaded, formats[0])
    grammar_for(bpe_loaded, formats[1])
    assert grammar_for(bpe_loaded, formats[0]) is first  # a hit makes it the most recent
    grammar_for(bpe_loaded, formats[2])  # evicts formats[1], the least recently used
    assert len(vocab.grammars) == 2 and grammar_for(bpe_loaded, formats[0]) is first
    compiles = vocab.compiles
    grammar_for(bpe_loaded, formats[1])
    assert vocab.compiles == compiles + 1


def test_a_constrained_request_is_never_plain_greedy(bpe_loaded):
    plain = RequestSampler(SamplingParams(temperature=0), [1, 2], "cpu")
    constrained = RequestSampler(SamplingParams(temperature=0, grammar=grammar_for(bpe_loaded, JSON_OBJECT)), [1, 2], "cpu")
    assert plain.is_plain_greedy and not constrained.is_plain_greedy


@pytest.mark.parametrize("which", LOADED)
def test_json_object_greedy_parses_only_with_the_constraint(which, request):
    loaded = request.getfixturevalue(which)
    free_text, _, _ = generate(loaded, SamplingParams(temperature=0, max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(free_text)
    text, reason, _ = generate(loaded, SamplingParams(temperature=0, max_new_tokens=200, grammar=grammar_for(loaded, JSON_OBJECT)))
    if reason == "stop":  # the random model may also wander inside a string until max_tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length" and text.lstrip().startswith("{")


@pytest.mark.parametrize("which", LOADED)
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7), (0.8, 11)])
def test_json_schema_verdict_validates(which, temperature, seed, request):
    loaded = request.getfixturevalue(which)
    params = SamplingParams(temperature=temperature, top_p=0.9, seed=seed, max_new_tokens=200, grammar=grammar_for(loaded, VERDICT_FORMAT))
    text, reason, _ = generate(loaded, params)
    assert reason == "stop"  # ended at the closing brace: the grammar was complete
    assert_verdict(text)
    assert text.rstrip().endswith("}")


@pytest.mark.parametrize("which", LOADED)
def test_max_tokens_cuts_a_constrained_answer_with_length(which, request):
    loaded = request.getfixturevalue(which)
    text, reason, ids = generate(loaded, SamplingParams(temperature=0, max_new_tokens=3, grammar=grammar_for(loaded, VERDICT_FORMAT)))
    assert reason == "length" and len(ids) == 3
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("which", ["sp_native", "bpe_native"])
def test_batched_with_an_unconstrained_request(which, request):
    """A constrained row in the batch changes neither the plain rows' output nor its own."""
    loaded = request.getfixturevalue(which)
    grammar = grammar_for(loaded, VERDICT_FORMAT)
    plain = SamplingParams(temperature=0, max_new_tokens=24)
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=24)
    constrained = SamplingParams(temperature=0.7, seed=5, max_new_tokens=200, grammar=grammar)
    alone = [generate(loaded, p) for p in (plain, sampled, constrained)]
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=4, max_queue=256)
    ids = prompt_ids(loaded)
    together = run(engine, [engine.submit(ids, p) for p in (plain, sampled, constrained)])
    assert together == alone
    assert together[2][1] == "stop"
    assert_verdict(together[2][0])
