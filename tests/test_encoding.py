"""core/encoding.py: the one "template + messages -> ids + stop strings" rule that chat, serve,
data split and train labels share (issue 12 item 3)."""

from __future__ import annotations

import pytest

from vicuna_cli.core.encoding import encode_prompt, merge_stops
from vicuna_cli.core.generate import ContextOverflow, EmptyPrompt
from vicuna_cli.core.templates import ChatTemplate, get_template
from vicuna_cli.data.split import TokenCounter

MESSAGES = [{"role": "user", "content": "Hello there"}]
# A Jinja template that writes BOS itself, as Llama-2/3 chat templates do.
BOS_WRITING_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
    "{% if add_generation_prompt %}[assistant]{% endif %}"


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sp_model_dir)


def test_a_fixed_template_gets_the_tokenizers_bos_once_and_its_stops_first(sp_tokenizer):
    template = get_template("vicuna_v1.1")
    prompt = encode_prompt(sp_tokenizer, template, MESSAGES, stop=["\n", "USER:"])
    text = template.prompt_text(MESSAGES, add_generation_prompt=True)
    assert prompt.ids == sp_tokenizer(text)["input_ids"]
    assert prompt.ids.count(sp_tokenizer.bos_token_id) == 1 and prompt.ids[0] == sp_tokenizer.bos_token_id
    assert prompt.stop == ("</s>", "USER:", "\n")


def test_a_jinja_template_that_writes_bos_is_not_given_a_second_one(sp_tokenizer):
    sp_tokenizer.chat_template = BOS_WRITING_TEMPLATE
    try:
        prompt = encode_prompt(sp_tokenizer, ChatTemplate(sp_tokenizer), MESSAGES)
    finally:
        sp_tokenizer.chat_template = None
    assert prompt.ids[0] == sp_tokenizer.bos_token_id
    assert prompt.ids.count(sp_tokenizer.bos_token_id) == 1
    assert prompt.stop == ()


@pytest.mark.parametrize("kind", ["fixed", "jinja"])
def test_data_split_counts_with_the_same_bos_rule(sp_tokenizer, kind):
    sp_tokenizer.chat_template = BOS_WRITING_TEMPLATE
    try:
        template = get_template("vicuna_v1.1") if kind == "fixed" else ChatTemplate(sp_tokenizer)
        text = template.prompt_text(MESSAGES, add_generation_prompt=True)
        counted = TokenCounter(sp_tokenizer, template).encode(text)
        assert list(counted.ids) == encode_prompt(sp_tokenizer, template, MESSAGES).ids
    finally:
        sp_tokenizer.chat_template = None


def test_a_completion_prompt_gets_bos_and_only_the_requests_stops(sp_tokenizer):
    prompt = encode_prompt(sp_tokenizer, get_template("vicuna_v1.1"), None, text="Once upon", stop=["."])
    assert prompt.ids == sp_tokenizer("Once upon")["input_ids"] and prompt.ids[0] == sp_tokenizer.bos_token_id
    assert prompt.stop == (".",)


def test_the_context_check_has_one_message(sp_tokenizer):
    template = get_template("vicuna_v1.1")
    length = len(encode_prompt(sp_tokenizer, template, MESSAGES).ids)
    assert encode_prompt(sp_tokenizer, template, MESSAGES, context_length=length + 1).ids  # one token of room: fits
    with pytest.raises(ContextOverflow) as info:
        encode_prompt(sp_tokenizer, template, MESSAGES, context_length=length)
    assert info.value.message == f"the prompt is {length} tokens but the model's context holds {length}"
    empty = type("Empty", (), {"__call__": lambda self, text, add_special_tokens: {"input_ids": []}})()
    with pytest.raises(EmptyPrompt):
        encode_prompt(empty, template, None, text="", context_length=8)


def test_merge_stops_keeps_the_first_of_each_in_order():
    assert merge_stops(("a", "b"), ["b", "c", "a"], ()) == ("a", "b", "c")
