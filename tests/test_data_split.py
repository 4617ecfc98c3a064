"""Splitting long conversations on exchange boundaries, counted with the model's real tokenizer and
template: a LLaMA-style SentencePiece tokenizer with vicuna_v1.1, and a byte-level BPE with its
own ChatML chat template."""

from __future__ import annotations

from collections import Counter

import pytest
from transformers import AutoTokenizer

from vicuna_cli.core.templates import ChatTemplate, template_for_model
from vicuna_cli.data.split import Splitter, TokenCounter, to_messages

WORDS = "hello there how are you I am fine thank you the capital of France is Paris".split()


@pytest.fixture(scope="module", params=["sp", "bpe"])
def counter(request):
    model_dir = request.getfixturevalue(f"{request.param}_model_dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TokenCounter(tokenizer, template_for_model(tokenizer))


def long_conversation(exchanges=6, system=False):
    turns = [{"from": "system", "value": "Be helpful and brief."}] if system else []
    for i in range(exchanges):
        turns.append({"from": "human", "value": f"Question {i}: " + " ".join(WORDS[: 3 + i])})
        turns.append({"from": "gpt", "value": f"Answer {i}: " + " ".join(WORDS[i:] * 2)})
    return {"id": "c", "model": "m", "conversations": turns}


def test_counts_are_the_training_render_through_the_real_tokenizer(counter):
    messages = to_messages(long_conversation(2)["conversations"])
    template = counter.template
    assert counter.render(messages) == template.render(messages, add_generation_prompt=False).text
    add_special = not isinstance(template, ChatTemplate)  # vicuna_v1.1 relies on the tokenizer's BOS
    assert template.name == ("auto" if isinstance(template, ChatTemplate) else "vicuna_v1.1")
    ids = counter.tokenizer(counter.render(messages), add_special_tokens=add_special)["input_ids"]
    assert counter.count(messages) == len(ids)
    if add_special:
        assert ids[0] == counter.tokenizer.bos_token_id


def test_a_conversation_of_exactly_max_length_is_kept_whole(counter):
    record = long_conversation(4)
    total = counter.count(to_messages(record["conversations"]))
    pieces, lengths, _ = Splitter(counter, total).split(record, Counter())
    assert pieces == [record] and lengths == [total]
    pieces, lengths, _ = Splitter(counter, total - 1).split(record, Counter())
    assert len(pieces) == 2 and max(lengths) <= total - 1


@pytest.mark.parametrize("system", [False, True])
def test_pieces_fill_up_to_the_limit_exactly_and_never_cut_a_turn(counter, system):
    record = long_conversation(7, system)
    head = record["conversations"][:1] if system else []
    body = record["conversations"][len(head):]
    limit = counter.count(to_messages(head + body[:6]))  # the first three exchanges, exactly
    notes = Counter()
    pieces, lengths, _ = Splitter(counter, limit).split(record, notes)
    assert pieces[0]["conversations"] == head + body[:6] and lengths[0] == limit
    rebuilt = []
    for piece, length in zip(pieces, lengths):
        assert piece["conversations"][: len(head)] == head  # the system turn starts every piece
        own = piece["conversations"][len(head):]
        start = body.index(own[0])
        assert piece["id"] == f"c_{len(head) + start}" and piece["model"] == "m"
        assert length == counter.count(to_messages(piece["conversations"])) <= limit
        following = body[start + len(own): start + len(own) + 2]
        if following:  # maximal: the next exchange would not have fitted
            assert counter.count(to_messages(piece["conversations"] + following)) > limit
        rebuilt += own
    assert rebuilt == body
    assert notes == {"split:conversations split": 1}


def test_an_exchange_longer_than_the_limit_is_dropped_and_counted(counter):
    record = long_conversation(3)
    record["conversations"][3]["value"] = " ".join(WORDS * 20)  # the second answer is huge
    limit = counter.count(to_messages(record["conversations"][:2])) + 4
    notes = Counter()
    pieces, _, _ = Splitter(counter, limit).split(record, notes)
    assert [p["id"] for p in pieces] == ["c_0", "c_4"]
    assert notes["split:exchanges longer than max-length dropped"] == 1
    pieces, _, reason = Splitter(counter, 5).split(record, Counter())
    assert pieces == [] and reason == "no exchange fits in 5 tokens"


def test_without_token_offsets_the_same_pieces_come_out(counter):
    class NoOffsets(TokenCounter):
        def encode(self, text):
            return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    slow = NoOffsets(counter.tokenizer, counter.template)
    record = long_conversation(7)
    for limit in (60, 90, 150):
        fast = Splitter(counter, limit).split(record, Counter())
        assert Splitter(slow, limit).split(record, Counter()) == fast


def test_turns_that_do_not_alternate_cannot_be_split(counter):
    record = {"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    pieces, _, reason = Splitter(counter, 100).split(record, Counter())
    assert pieces == [] and "do not alternate" in reason


@pytest.mark.parametrize("fixture", ["sp_model_dir", "bpe_model_dir"])
def test_the_tokenizer_vicuna_loads_counts_like_transformers(request, fixture):
    """`clean -m` reads tokenizer.json without transformers; the counts must not change."""
    from vicuna_cli.data.pipeline import load_token_counter

    model_dir = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = TokenCounter(tokenizer, template_for_model(tokenizer))
    loaded = load_token_counter(str(model_dir), None)
    assert type(loaded.tokenizer).__name__ == "FastTokenizer" and loaded.template.name == reference.template.name
    for exchanges, system in ((1, False), (5, True)):
        messages = to_messages(long_conversation(exchanges, system)["conversations"])
        assert loaded.render(messages) == reference.render(messages)
        assert loaded.count(messages) == reference.count(messages)
    record = long_conversation(7)
    assert Splitter(loaded, 90).split(record, Counter()) == Splitter(reference, 90).split(record, Counter())


def test_run_counts_read_off_the_whole_encoding_equal_tokenizing_each_run(counter, monkeypatch):
    """Every run [s, e) of a long conversation: the count taken from the one encoding of the whole
    conversation (cut at added tokens: </s> for vicuna_v1.1, <|im_start|>/<|im_end|> for ChatML)
    equals tokenizing the run's own rendering."""
    from vicuna_cli.data.split import _Exchanges

    record = long_conversation(6, system=True)
    head, body = to_messages(record["conversations"][:1]), record["conversations"][1:]
    pairs = [to_messages(body[i:i + 2]) for i in range(0, len(body), 2)]
    text = counter.render(head + [m for p in pairs for m in p])
    runs = _Exchanges(counter, head, pairs, text, counter.encode(text))
    tokenized = []
    real = counter.count_text
    monkeypatch.setattr(counter, "count_text", lambda t: tokenized.append(t) or real(t))
    for s in range(6):
        for e in range(s + 1, 7):
            expected = real(counter.render(head + [m for p in pairs[s:e] for m in p]))
            assert runs.count(s, e) == expected
    assert len(tokenized) == 6  # each exchange alone once; no run of two or more was tokenized


def test_without_added_tokens_at_the_cuts_runs_are_tokenized_and_still_exact(counter):
    """vicuna_v0 separates turns with plain text ('\\n### Human:'): no cut can be proven."""
    from vicuna_cli.core.templates import get_template
    from vicuna_cli.data.split import _Exchanges

    plain = TokenCounter(counter.tokenizer, get_template("vicuna_v0"))
    pairs = [to_messages(long_conversation(4)["conversations"][i:i + 2]) for i in range(0, 8, 2)]
    text = plain.render([m for p in pairs for m in p])
    runs = _Exchanges(plain, [], pairs, text, plain.encode(text))
    calls = []
    real = plain.count_text
    plain.count_text = lambda t: calls.append(t) or real(t)
    expected = real(plain.render([m for p in pairs[:3] for m in p]))
    assert runs.count(0, 3) == expected and calls[-1] == plain.render([m for p in pairs[:3] for m in p])
