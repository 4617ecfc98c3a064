"""A light tokenizer over `tokenizers` + Jinja, for the native (fast-start) model path.

It offers the part of transformers' tokenizer API that vicuna uses — `__call__`, `decode`,
special token ids, `chat_template` and `apply_chat_template` — reading the same files
(tokenizer.json, tokenizer_config.json, chat_template.jinja) and rendering chat templates the
way transformers does (sandboxed Jinja, trim_blocks, lstrip_blocks, `raise_exception`,
`strftime_now`). `tests/test_native.py` checks that ids, decoding and renders match
AutoTokenizer. Used because importing transformers costs ~2.5 s of a 3 s cold-start budget.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        self.chat_template = self._find_chat_template(model_dir, config)

    @staticmethod
    def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template}
            return named.get("default")
        return template

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        text = self.special.get(name)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eos_token(self) -> str | None:
        return self.special["eos_token"]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        # clean_up_tokenization_spaces is accepted for API parity; vicuna always passes False.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            from jinja2.exceptions import TemplateError

            raise TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> Any:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **{name: value for name, value in self.special.items() if value is not None},
        )
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text
