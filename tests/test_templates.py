"""Golden renders from ../shared/specs/templates.md, byte for byte."""

import pytest

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.generate import StopStringFilter
from vicuna_cli.core.templates import (
    EXAMPLE_CONVERSATION,
    ChatTemplate,
    get_template,
    template_for_model,
    template_names,
)

GOLDEN = {
    "vicuna_v1.1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hi there ASSISTANT: Hello! How can I help?</s>USER: Tell me a joke. ASSISTANT:",
    "vicuna_v0": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.\n### Human: Hi there\n### Assistant: Hello! How can I help?\n### Human: Tell me a joke.\n### Assistant:",
    "stable-vicuna": "### Assistant: I am StableVicuna, a large language model created by CarperAI. I am here to chat!\n\n### Human: Hi there\n### Assistant: Hello! How can I help?\n\n### Human: Tell me a joke.\n### Assistant:",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction: Hi there\n\n### Response: Hello! How can I help?</s>### Instruction: Tell me a joke.\n\n### Response:",
    "llama-2": "[INST] Hi there [/INST] Hello! How can I help? </s><s>[INST] Tell me a joke. [/INST]",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_render(name):
    assert get_template(name).render(EXAMPLE_CONVERSATION).text == GOLDEN[name]


def test_llama2_system_message_goes_inside_first_inst():
    messages = [{"role": "system", "content": "Be brief."}, *EXAMPLE_CONVERSATION]
    assert get_template("llama-2").render(messages).text == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s><s>[INST] Tell me a joke. [/INST]"
    )


def test_system_message_replaces_the_default():
    messages = [{"role": "system", "content": "You are terse."}, *EXAMPLE_CONVERSATION]
    text = get_template("vicuna_v1.1").render(messages).text
    assert text.startswith("You are terse. USER: Hi there ASSISTANT:")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_assistant_spans_cover_content_and_end_marker(name):
    template = get_template(name)
    rendered = template.render(EXAMPLE_CONVERSATION + [{"role": "assistant", "content": "Why not?"}], add_generation_prompt=False)
    pieces = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    assert [p.startswith(c) for p, c in zip(pieces, ["Hello! How can I help?", "Why not?"])] == [True, True]
    assert len(pieces) == 2
    assert all(len(p) > len(c) for p, c in zip(pieces, ["Hello! How can I help?", "Why not?"]))  # end marker included


# From the spec's stop rules: the EOS text "</s>" and the template's next user turn marker (the
# user role as the render writes it, with the newline that precedes it where the render has one).
EXPECTED_STOPS = {
    "vicuna_v1.1": ("</s>", "USER:"),
    "vicuna_v0": ("\n### Human:", "</s>"),
    "stable-vicuna": ("\n### Human:", "</s>"),
    "alpaca": ("</s>", "\n### Instruction:"),
    "llama-2": ("</s>", "[INST]"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_stop_strings_are_exactly_eos_and_the_next_user_turn(name):
    template = get_template(name)
    assert template.stop == EXPECTED_STOPS[name]
    user = template.roles[0]
    assert all(stop == "</s>" or stop.lstrip("\n").startswith(user) for stop in template.stop)
    assert sorted(EXPECTED_STOPS) == sorted(GOLDEN)  # every golden template has its expected stops


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_stop_strings_end_an_answer_that_runs_into_the_next_turn(name):
    """A model that keeps writing past its answer produces the template's own next-turn text; the
    template's stop strings must cut it exactly at the end of the answer (streamed char by char)."""
    template = get_template(name)
    prompt = template.render(EXAMPLE_CONVERSATION[:1]).text
    full = template.render(EXAMPLE_CONVERSATION).text
    assert full.startswith(prompt)
    stops = StopStringFilter(template.stop)
    answer = "".join(stops.feed(ch) for ch in full[len(prompt):]) + stops.flush()
    assert stops.stopped
    assert answer.strip() == EXAMPLE_CONVERSATION[1]["content"]


def test_unknown_template_lists_known_names():
    with pytest.raises(VicunaError) as info:
        get_template("vicuna_v9")
    assert "vicuna_v9" in info.value.message
    for name in template_names():
        assert name in info.value.message


def test_fastchat_names_are_accepted():
    assert get_template("zero_shot").name == "vicuna_v0"


def test_turns_must_alternate():
    with pytest.raises(VicunaError, match="alternate"):
        get_template("vicuna_v1.1").render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(VicunaError, match="unknown role"):
        get_template("vicuna_v1.1").render([{"role": "robot", "content": "a"}])


def test_auto_uses_the_tokenizers_chat_template(bpe_loaded, sp_loaded):
    template = template_for_model(bpe_loaded.tokenizer)
    assert isinstance(template, ChatTemplate)
    rendered = template.render(EXAMPLE_CONVERSATION)
    assert rendered.text == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n"
    )
    (start, end), = rendered.assistant_spans
    assert rendered.text[start:end] == "Hello! How can I help?<|im_end|>\n"
    # A tokenizer without a chat template falls back to vicuna_v1.1, and `auto` says why it cannot.
    assert template_for_model(sp_loaded.tokenizer).name == "vicuna_v1.1"
    with pytest.raises(VicunaError, match="no chat template"):
        get_template("auto", sp_loaded.tokenizer)


def test_llama2_assistant_span_ends_at_eos_not_at_the_next_bos():
    messages = EXAMPLE_CONVERSATION + [{"role": "assistant", "content": "Why not?"}]
    rendered = get_template("llama-2").render(messages, add_generation_prompt=False)
    pieces = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    assert pieces == ["Hello! How can I help? </s>", "Why not? </s>"]
    assert rendered.text[rendered.assistant_spans[0][1]:].startswith("<s>[INST] Tell me a joke.")
