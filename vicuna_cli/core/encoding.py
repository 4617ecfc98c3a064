"""Conversation -> what a model is fed: the ONE place for "template + messages -> token ids and
stop strings" (`encode_prompt`), and for the rules it is made of:

- the BOS rule (`template_writes_special_tokens`): a Jinja chat template writes its own BOS and
  turn markers into the text, so the tokenizer must not add them again; the fixed templates
  leave BOS to the tokenizer. Chat, serve, data split, train labels and PPO prompts all ask here;
- stop strings (`merge_stops`): the template's first, then the request's, without repeats;
- the context check (`generate.check_prompt`): one message, from `generate.ContextOverflow`.

Chat (`chat/backends.py`) and serve (`serve/backends/hf.py`, `vllm_engine.py`) call `encode_prompt`;
data split and train labels batch-encode rendered text themselves (token offsets, a fast
tokenizer's `encode_batch`) but take the BOS rule from here through `data.split.TokenCounter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .generate import check_prompt
from .templates import ChatTemplate, Message, Template


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    stop: tuple[str, ...]  # the template's stop strings (for a conversation), then the request's


def template_writes_special_tokens(template: Template | ChatTemplate) -> bool:
    """True for a Jinja chat template (`auto`): its text already holds BOS and the turn markers."""
    return isinstance(template, ChatTemplate)


def add_special_tokens(template: Template | ChatTemplate) -> bool:
    """What to pass as the tokenizer's `add_special_tokens` for text this template rendered."""
    return not template_writes_special_tokens(template)


def merge_stops(*groups: Iterable[str]) -> tuple[str, ...]:
    """Stop strings of several sources in order, each once."""
    return tuple(dict.fromkeys(stop for group in groups for stop in group))


def encode_prompt(
    tokenizer: Any,
    template: Template | ChatTemplate,
    messages: Sequence[Message] | None = None,
    *,
    text: str | None = None,
    stop: Iterable[str] = (),
    context_length: int | None = None,
) -> EncodedPrompt:
    """A conversation (rendered with `template`, ready for the assistant's turn) or a raw `text`
    (a completion prompt: the tokenizer adds BOS, no template stops) -> ids and stop strings.

    With `context_length`, an empty prompt or one that leaves no room to generate raises
    (VicunaError / ContextOverflow, see `generate.check_prompt`); template failures raise
    VicunaError from `core.templates`.
    """
    if messages is not None:
        rendered = template.prompt_text(messages, add_generation_prompt=True)
        ids = list(tokenizer(rendered, add_special_tokens=add_special_tokens(template))["input_ids"])
        stops = merge_stops(template.stop, stop)
    else:
        ids = list(tokenizer(text or "", add_special_tokens=True)["input_ids"])
        stops = merge_stops(stop)
    if context_length is not None:
        check_prompt(ids, context_length)
    return EncodedPrompt(ids, stops)
