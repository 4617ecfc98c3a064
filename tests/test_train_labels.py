"""Label masks (../shared/specs/masking.md): golden masks, properties, truncation, loud mismatches."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.templates import get_template, template_for_model
from vicuna_cli.train.dataset import Conversation
from vicuna_cli.train.labels import IGNORE, LabelBuilder

THREE_TURNS = Conversation("g1", [
    {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why not?"},
    {"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "반갑습니다 🙂"},
])


@pytest.fixture(scope="module")
def sp_tok(sp_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sp_model_dir)


@pytest.fixture(scope="module")
def bpe_tok(bpe_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_model_dir)


def runs(sample):
    """Supervised token ids, grouped into maximal runs."""
    out, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == token  # labels are unshifted copies of the ids
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


GOLDEN = {
    ("sp", "vicuna_v1.1"): [
        ["▁H", "el", "lo", "<0x21>", "▁H", "o", "w", "▁", "c", "an", "▁I", "▁", "he", "l", "p", "?", "</s>"],
        ["<0x57>", "h", "y", "▁n", "o", "t", "?", "</s>"],
        ["▁반", "갑습", "니다", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "</s>"],
    ],
    ("sp", "llama-2"): [
        ["▁H", "el", "lo", "<0x21>", "▁H", "o", "w", "▁", "c", "an", "▁I", "▁", "he", "l", "p", "?", "▁", "</s>"],
        ["<0x57>", "h", "y", "▁n", "o", "t", "?", "▁", "</s>"],
        ["▁반", "갑습", "니다", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "▁", "</s>"],
    ],
    ("bpe", None): [  # ChatML: content + <|im_end|>, not the newline after it
        ["Hello", "!", "Ġ", "H", "o", "w", "Ġ", "c", "an", "ĠI", "Ġ", "he", "l", "p", "?", "<|im_end|>"],
        ["W", "h", "y", "Ġ", "n", "o", "t", "?", "<|im_end|>"],
        ["ë", "°ĺ", "ê°ĳìĬ", "µëĭĪëĭ¤", "ĠðŁ", "Ļ", "Ĥ", "<|im_end|>"],
    ],
    ("bpe", "vicuna_v1.1"): [  # "</s>" is plain text for this tokenizer: its 4 tokens are supervised
        ["Hello", "!", "Ġ", "H", "o", "w", "Ġ", "c", "an", "ĠI", "Ġ", "he", "l", "p", "?", "<", "/", "s", ">"],
        ["W", "h", "y", "Ġ", "n", "o", "t", "?", "<", "/", "s", ">"],
        ["Ġë°ĺê°ĳìĬµëĭĪëĭ¤", "ĠðŁ", "Ļ", "Ĥ", "<", "/", "s", ">"],
    ],
}


@pytest.mark.parametrize("which", sorted(GOLDEN, key=str), ids=lambda k: f"{k[0]}-{k[1] or 'chatml'}")
def test_golden_masks_of_a_three_turn_conversation(which, sp_tok, bpe_tok):
    tokenizer = sp_tok if which[0] == "sp" else bpe_tok
    sample = LabelBuilder(tokenizer, template_for_model(tokenizer, which[1]), 2048).build(THREE_TURNS)
    assert [tokenizer.convert_ids_to_tokens(run) for run in runs(sample)] == GOLDEN[which]
    assert sample.labels[0] == IGNORE
    # Everything else is masked: the supervised count is exactly the golden tokens.
    assert sample.n_supervised == sum(len(run) for run in GOLDEN[which])


def test_sentencepiece_boundary_space_goes_with_the_first_content_token(sp_tok):
    """" ASSISTANT: Hello" -> "▁H" carries the separator space, and it is supervised; the role tag
    before it is not."""
    sample = LabelBuilder(sp_tok, get_template("vicuna_v1.1"), 2048).build(THREE_TURNS)
    first = sample.labels.index(next(label for label in sample.labels if label != IGNORE))
    assert sp_tok.convert_ids_to_tokens(sample.input_ids[first - 2:first + 1]) == ["ANT", ":", "▁H"]
    assert sample.labels[first - 1] == IGNORE


def test_ids_are_what_the_tokenizer_gives_for_the_rendered_text(sp_tok, bpe_tok):
    for tokenizer, template in ((sp_tok, get_template("vicuna_v1.1")), (bpe_tok, template_for_model(bpe_tok))):
        text = template.render(THREE_TURNS.messages, add_generation_prompt=False).text
        sample = LabelBuilder(tokenizer, template, 2048).build(THREE_TURNS)
        expected = tokenizer(text, add_special_tokens=template.name != "auto")["input_ids"]
        assert sample.input_ids == expected


# --- properties ---------------------------------------------------------------------------------

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzHWT.,!?'0123456789안녕하세요반갑습니다你好🙂", min_size=1, max_size=8)
CONTENT = st.lists(WORD, min_size=1, max_size=6).map(" ".join)
CONVERSATION = st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=4)
CASES = [("sp", "vicuna_v1.1", "</s>"), ("sp", "llama-2", " </s>"), ("bpe", None, "<|im_end|>"),
         ("bpe", "alpaca", "</s>")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1] or 'chatml'}")
def test_mask_properties(case, sp_tok, bpe_tok):
    tokenizer = sp_tok if case[0] == "sp" else bpe_tok
    builder = LabelBuilder(tokenizer, template_for_model(tokenizer, case[1]), 4096)

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(CONVERSATION)
    def check(pairs):
        messages = [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        conversation = Conversation("p", messages)
        sample = builder.build(conversation)
        text, spans = builder.render(conversation)
        encoding = builder.counter.encode(text)
        got = runs(sample)
        # one run per assistant turn, each decoding to content + end marker (modulo the boundary space)
        assert len(got) == len(pairs)
        assert [tokenizer.decode(run).lstrip() for run in got] == [a + case[2] for _, a in pairs]
        assert sample.labels[0] == IGNORE
        for k, (start, end) in enumerate(encoding.offsets):
            inside = any(a <= start < b or (start < a < end and not text[start:a].strip()) for a, b in spans)
            # every supervised token lies inside an assistant span; tokens with text inside one are supervised
            assert (sample.labels[k] != IGNORE) == (end > start and inside)

    check()


@pytest.mark.parametrize("name", ["vicuna_v1.1", "auto"])
def test_user_text_is_never_supervised(name, sp_tok, bpe_tok):
    tokenizer = sp_tok if name != "auto" else bpe_tok
    builder = LabelBuilder(tokenizer, template_for_model(tokenizer, None if name == "auto" else name), 4096)
    text, spans = builder.render(THREE_TURNS)
    encoding = builder.counter.encode(text)
    sample = builder.build(THREE_TURNS)
    for user in ("Hi there", "Tell me a joke.", "안녕하세요"):
        a = text.index(user)
        b = a + len(user)
        for k, (s, e) in enumerate(encoding.offsets):
            if s < b and e > a:
                assert sample.labels[k] == IGNORE, (user, tokenizer.convert_ids_to_tokens([encoding.ids[k]]))


# --- truncation -----------------------------------------------------------------------------------


def turn_ends(sample):
    ends, previous = [], IGNORE
    for k, label in enumerate(sample.labels + [IGNORE]):
        if label == IGNORE and previous != IGNORE:
            ends.append(k - 1)
        previous = label
    return ends


def test_truncation_cuts_at_the_end_of_an_assistant_turn(sp_tok):
    template = get_template("vicuna_v1.1")
    full = LabelBuilder(sp_tok, template, 4096).build(THREE_TURNS)
    end1, end2, end3 = turn_ends(full)
    cases = {
        "inside the third user turn": (end2 + 4, end2 + 1),
        "inside the second assistant turn": (end2 - 2, end1 + 1),
        "exactly on a boundary": (end2 + 1, end2 + 1),
        "one token short of a boundary": (end2, end1 + 1),
    }
    for what, (max_length, expected_length) in cases.items():
        notes = Counter()
        sample = LabelBuilder(sp_tok, template, max_length).build(THREE_TURNS, notes)
        assert len(sample) == expected_length, what
        assert sample.input_ids == full.input_ids[:expected_length], what
        assert sample.labels == full.labels[:expected_length], what
        assert notes == Counter({"truncated at the end of an assistant turn": 1}), what
    assert len(full) == end3 + 1


def test_a_sample_whose_first_answer_does_not_fit_is_dropped_and_counted(sp_tok):
    full = LabelBuilder(sp_tok, get_template("vicuna_v1.1"), 4096).build(THREE_TURNS)
    notes = Counter()
    assert LabelBuilder(sp_tok, get_template("vicuna_v1.1"), turn_ends(full)[0]).build(THREE_TURNS, notes) is None
    assert notes == Counter({"no assistant turn ends within --max-length": 1})


# --- loud failures ---------------------------------------------------------------------------------


def test_offsets_that_disagree_with_the_text_fail_with_the_sample_id(sp_tok):
    builder = LabelBuilder(sp_tok, get_template("vicuna_v1.1"), 4096)
    text = "USER: a ASSISTANT: bc</s>"
    span = (text.index("bc"), len(text))
    # a token running from the answer into the text after the span
    with pytest.raises(VicunaError, match=r"sample s-7: .*runs past the end-of-turn marker"):
        builder.mask("s-7", text + "X", [span], [1, 2, 3], [(0, 5), (span[0], span[0] + 1), (span[0] + 1, len(text) + 1)], Counter())
    # a token that glues the role tag onto the answer
    with pytest.raises(VicunaError, match=r"sample s-8: .*starts before"):
        builder.mask("s-8", text, [span], [1, 2], [(0, span[0] + 1), (span[0] + 1, len(text))], Counter())


def test_a_tokenizer_that_drops_characters_is_a_mismatch_not_a_silent_mask(bpe_model_dir, tmp_path):
    from tokenizers import Tokenizer, normalizers
    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(bpe_model_dir, model)
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    raw.normalizer = normalizers.Replace("!", "")
    raw.save(str(model / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    with pytest.raises(VicunaError, match=r"sample g1: .*assistant turn 1: character \d+ \('!'\) has no token"):
        LabelBuilder(tokenizer, template_for_model(tokenizer), 4096).build(THREE_TURNS)


def test_a_chat_template_without_assistant_spans_is_refused(bpe_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    # renders the newest message first, so no turn's text extends the prompt before it
    tokenizer.chat_template = "{% for m in messages|reverse %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(VicunaError, match=r"sample g1: template 'auto' renders 0 assistant span\(s\) for 3"):
        LabelBuilder(tokenizer, template_for_model(tokenizer), 4096).build(THREE_TURNS)


def test_inspect_data_shows_supervised_tokens(sp_model_dir, tmp_path):
    from typer.testing import CliRunner

    from vicuna_cli.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "x1", "conversations": [
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}) + "\n")
    result = CliRunner().invoke(app, ["train", "inspect-data", "-m", str(sp_model_dir), "--data", str(data), "-s", "x1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "sample x1 · template vicuna_v1.1" in lines[0]
    rows = [line.split("│") for line in lines if line.count("│") == 4]
    supervised = [r[2].strip() for r in rows if r[4].strip() != "-100"]
    assert supervised == ["▁H", "el", "lo", "<0x21>", "</s>"]
    assert "5 of" in lines[-1] and "tokens supervised" in lines[-1]
    missing = CliRunner().invoke(app, ["train", "inspect-data", "-m", str(sp_model_dir), "--data", str(data), "-s", "nope"])
    assert missing.exit_code != 0
