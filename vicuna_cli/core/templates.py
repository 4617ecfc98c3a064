"""Conversation templates: the ONE place that turns messages into a prompt string.

Training, chat, serving and judging all render through this module, so a model is always spoken
to in the format it was trained on. Messages are OpenAI-shaped dicts: {"role", "content"} with
roles "system", "user" and "assistant". Golden renders live in `../shared/specs/templates.md` and
`tests/test_templates.py`.

Every render also returns the character spans of the assistant turns (content plus the end-of-turn
marker that follows it): label masking in training is built from these spans over one rendered
string, never from separately tokenized turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from .errors import VicunaError, first_line, unknown_choice

Message = dict[str, str]
Style = Literal["colon_two", "colon_single", "llama2"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendered:
    text: str
    # (start, end) character offsets of each assistant message content + its end-of-turn marker.
    assistant_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Template:
    """A fixed-string template in the style of FastChat's `Conversation` (one of three layouts).

    colon_two:    {system}{sep}{U}: {msg}{sep}{A}: {msg}{sep2}...{A}:
    colon_single: {system}{sep}{U}: {msg}{sep}{A}: {msg}{sep}...{A}:
    llama2:       [INST] <<SYS>>..<</SYS>>\\n\\n{msg} [/INST] {msg} </s><s>[INST] {msg} [/INST]
    """

    name: str
    description: str
    style: Style
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str = ""
    stop: tuple[str, ...] = ()
    # Only for llama2: how a system message is wrapped inside the first [INST].
    system_template: str = "{system}"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Rendered:
        system, turns = split_system(messages, self.system)
        if self.style == "llama2":
            return self._render_llama2(system, turns, add_generation_prompt)
        user_role, assistant_role = self.roles
        parts: list[str] = [self.system_template.format(system=system), self.sep]
        spans: list[tuple[int, int]] = []
        length = len(parts[0]) + len(self.sep)
        for message in turns:
            if message["role"] == "user":
                piece = f"{user_role}: {message['content']}{self.sep}"
                parts.append(piece)
                length += len(piece)
            else:
                end = self.sep2 if self.style == "colon_two" else self.sep
                head = f"{assistant_role}: "
                body = f"{message['content']}{end}"
                spans.append((length + len(head), length + len(head) + len(body)))
                parts.append(head + body)
                length += len(head) + len(body)
        if add_generation_prompt:
            parts.append(f"{assistant_role}:")
        return Rendered("".join(parts), tuple(spans))

    def prompt_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """`render(...).text`: the spans cost nothing extra here."""
        return self.render(messages, add_generation_prompt).text

    def _render_llama2(self, system: str, turns: list[Message], add_generation_prompt: bool) -> Rendered:
        user_tag, assistant_tag = self.roles
        text = f"{user_tag} " + (self.system_template.format(system=system) if system else "")
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(turns):
            if message["role"] == "user":
                text += (message["content"] + " ") if i == 0 else f"{user_tag} {message['content']} "
            else:
                head = f"{assistant_tag} "
                start = len(text) + len(head)
                text += head + message["content"] + self.sep2
                # The turn ends at "</s>": the "<s>" after it opens the next turn, so it is not
                # part of what the assistant says (and must not be supervised in training).
                end_of_turn = self.sep2.find("</s>") + len("</s>") if "</s>" in self.sep2 else len(self.sep2)
                spans.append((start, len(text) - len(self.sep2) + end_of_turn))
        if add_generation_prompt:
            text += assistant_tag
        return Rendered(text, tuple(spans))


@dataclass(frozen=True)
class ChatTemplate:
    """`auto`: the tokenizer's own Jinja chat template (ChatML, Llama-3, ...)."""

    tokenizer: Any
    name: str = "auto"
    description: str = "the tokenizer's own chat template (ChatML, Llama-3, ...)"
    stop: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> Rendered:
        messages = [dict(m) for m in messages]
        validate_messages(messages)
        text = self._apply(messages, add_generation_prompt)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The span of an assistant turn = what its addition appends to the prompt before it.
            before = self._apply(messages[:i], True)
            through = self._apply(messages[: i + 1], False)
            if through.startswith(before) and text.startswith(through):
                spans.append((len(before), len(through)))
        return Rendered(text, tuple(spans))

    def prompt_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """`render(...).text` in ONE Jinja render: the spans would cost two more per assistant turn,
        which made a long conversation quadratic to prompt."""
        messages = [dict(m) for m in messages]
        validate_messages(messages)
        return self._apply(messages, add_generation_prompt)

    def _apply(self, messages: list[Message], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import SecurityError, TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # The template is the model's (a file in its folder), so its failures are the user's to fix,
        # not bugs of vicuna: name the template and the way around it.
        except (SecurityError, OverflowError) as exc:  # the sandbox blocked it (OverflowError: a huge range())
            raise VicunaError(
                f"the model's chat template is unsafe: the Jinja sandbox blocked it ({first_line(exc)})",
                hint=f"use a built-in template with --template NAME ({', '.join(_BUILTIN)})",
            ) from None
        except TemplateError as exc:  # raise_exception(...) in the template, bad syntax, an undefined name
            raise VicunaError(
                f"the model's chat template failed on this conversation: {first_line(exc)}",
                hint=f"use a built-in template with --template NAME ({', '.join(_BUILTIN)})",
            ) from None


_BUILTIN: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            name="vicuna_v1.1",
            description="Vicuna v1.1/v1.3/v1.5: 'USER: ... ASSISTANT: ...</s>' on one line",
            style="colon_two",
            system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
            roles=("USER", "ASSISTANT"),
            sep=" ",
            sep2="</s>",
            stop=("</s>", "USER:"),
        ),
        Template(
            name="vicuna_v0",
            description="the first Vicuna release: '### Human: / ### Assistant:' (FastChat zero_shot)",
            style="colon_single",
            system=(
                "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions."
            ),
            roles=("### Human", "### Assistant"),
            sep="\n",
            stop=("\n### Human:", "</s>"),
        ),
        Template(
            name="stable-vicuna",
            description="CarperAI StableVicuna-13B: '### Human: / ### Assistant:' with blank lines",
            style="colon_two",
            system="### Assistant: I am StableVicuna, a large language model created by CarperAI. I am here to chat!\n",
            roles=("### Human", "### Assistant"),
            sep="\n",
            sep2="\n\n",
            stop=("\n### Human:", "</s>"),
        ),
        Template(
            name="alpaca",
            description="Stanford Alpaca: '### Instruction: / ### Response:'",
            style="colon_two",
            system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request."
            ),
            roles=("### Instruction", "### Response"),
            sep="\n\n",
            sep2="</s>",
            stop=("</s>", "\n### Instruction:"),
        ),
        Template(
            name="llama-2",
            description="Llama-2-chat: '[INST] <<SYS>>...<</SYS>> ... [/INST]'",
            style="llama2",
            system="",
            roles=("[INST]", "[/INST]"),
            sep=" ",
            sep2=" </s><s>",
            system_template="<<SYS>>\n{system}\n<</SYS>>\n\n",
            stop=("</s>", "[INST]"),
        ),
    ]
}

# The first Vicuna release's format is also known by FastChat's name for it.
_ALIASES = {"zero_shot": "vicuna_v0", "vicuna": "vicuna_v1.1", "llama2": "llama-2"}

DEFAULT_TEMPLATE = "vicuna_v1.1"


def template_names() -> list[str]:
    return [*_BUILTIN, "auto"]


def get_template(name: str, tokenizer: Any = None) -> Template | ChatTemplate:
    """The template called `name`; `auto` needs the tokenizer whose chat template it uses."""
    name = _ALIASES.get(name, name)
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name == "auto":
        if tokenizer is None:
            raise VicunaError("template 'auto' needs a model: it uses the tokenizer's chat template")
        if not getattr(tokenizer, "chat_template", None):
            raise VicunaError(
                "this model's tokenizer has no chat template, so --template auto cannot be used",
                hint=f"pick one with --template ({', '.join(_BUILTIN)})",
            )
        return ChatTemplate(tokenizer)
    raise unknown_choice("template", name, template_names(), hint="list them with `vicuna templates`")


def template_for_model(tokenizer: Any, requested: str | None = None) -> Template | ChatTemplate:
    """The requested template, else the tokenizer's own, else vicuna_v1.1 (LLaMA-family bases)."""
    if requested:
        return get_template(requested, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate(tokenizer)
    return _BUILTIN[DEFAULT_TEMPLATE]


def validate_messages(messages: Sequence[Message]) -> None:
    """Roles must be known and, after an optional leading system message, alternate user/assistant."""
    expected = "user"
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(message.get("content"), str):
            raise VicunaError(f"message {i} has no text content")
        if role == "system" and i == 0:
            continue
        if role not in ROLES:
            raise unknown_choice("role", str(role), list(ROLES))
        if role != expected:
            raise VicunaError(
                f"message {i} is from {role!r} but {expected!r} was expected: turns must alternate "
                "user/assistant after an optional leading system message"
            )
        expected = "assistant" if role == "user" else "user"


def split_system(messages: Sequence[Message], default: str) -> tuple[str, list[Message]]:
    validate_messages(messages)
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return default, list(messages)


EXAMPLE_CONVERSATION: list[Message] = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
