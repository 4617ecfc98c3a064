"""A chat conversation: history, system message, sampling settings, and what each turn cost.

Shared by the interactive REPL and the non-interactive (scripted) mode. History that no longer
fits the model's context is trimmed from the oldest turn, and the user is told.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import VicunaError
from ..core.generate import ContextOverflow, GenerationStats, SamplingParams
from ..core.store import atomic_write_text
from ..core.templates import Message, validate_messages
from .backends import ChatBackend

# Room kept for the answer when deciding whether the history still fits.
MIN_ANSWER_TOKENS = 64


@dataclass
class ChatSession:
    backend: ChatBackend
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None  # None: the template's own default system message
    messages: list[Message] = field(default_factory=list)  # user/assistant turns only
    last_stats: GenerationStats | None = None
    notify: Callable[[str], None] = lambda message: None
    invalid_inputs: int = 0  # texts that held bytes which are not UTF-8 (replaced, said once)

    def __post_init__(self) -> None:
        if self.system is not None:
            self.system = self.clean(self.system)

    def clean(self, text: str) -> str:
        """`text` with what was not valid UTF-8 replaced by U+FFFD.

        Readers keep undecodable bytes as lone surrogates (stdin read with surrogateescape,
        Python's argv, a JSON "\\udcff" escape); the tokenizer and stdout cannot encode those,
        which crashed chat on the line and never answered the next one."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
        try:
            fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte (e.g. from a JSON escape)
            fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        self.invalid_inputs += 1
        if self.invalid_inputs == 1:
            self.notify("input is not valid UTF-8: its undecodable bytes were replaced with U+FFFD (said once)")
        return fixed

    def conversation(self, turns: list[Message] | None = None) -> list[Message]:
        """The system message (if set) followed by `turns` (default: the session's turns)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + (self.messages if turns is None else turns)

    # -- turns ------------------------------------------------------------------------------

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. The turn is kept even if the stream is cut short."""
        self.messages.append({"role": "user", "content": self.clean(text)})
        return self._answer(on_failure=self.messages.pop)

    def regenerate(self) -> Iterator[str]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise VicunaError("there is no answer to regenerate yet")
        previous = self.messages.pop()
        return self._answer(on_failure=lambda: self.messages.append(previous))

    def _answer(self, on_failure: Callable[[], Any]) -> Iterator[str]:
        try:
            self._fit_context()
            stream = self.backend.start(self.conversation(), self.params)
        except BaseException:
            on_failure()  # nothing was generated: leave the history as it was
            raise
        answer: list[str] = []
        try:
            for delta in stream:
                answer.append(delta)
                yield delta
        finally:  # normal end, Ctrl-C, or an error mid-stream: keep what was said
            stream.cancel()
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            self.last_stats = stream.stats

    def _fit_context(self) -> None:
        """Drop the fewest oldest exchanges (user turn + answer) that make the prompt fit; change
        nothing if even the newest message alone cannot fit.

        A binary search over the number dropped: O(log n) renders of the conversation, where
        dropping one exchange at a time re-rendered it once per exchange (2,000 exchanges after
        /load never got an answer). It finds what the one-at-a-time rule found because the prompt
        only gets shorter as more of its oldest exchanges go (tests/test_session.py compares them).
        """
        if not self.backend.trims_history:
            return
        limit = self.backend.engine.context_length
        reserve = min(MIN_ANSWER_TOKENS, self.params.max_new_tokens)
        lengths: dict[int, int] = {}

        def fits(dropped: int) -> bool:
            kept = self.messages[2 * dropped:]
            lengths[dropped] = len(self.backend.prompt_ids(self.conversation(kept)))
            return lengths[dropped] + reserve <= limit

        if fits(0):
            return
        most = len(self.messages) // 2  # exchanges are dropped while more than one message is left
        if most == 0 or not fits(most):
            raise ContextOverflow(lengths[most], limit, reserve)
        too_few, enough = 0, most
        while enough - too_few > 1:
            middle = (too_few + enough) // 2
            if fits(middle):
                enough = middle
            else:
                too_few = middle
        self.messages[:] = self.messages[2 * enough:]
        self.notify(f"history trimmed: dropped the {enough} oldest turn(s) to fit the {limit}-token context")

    # -- history editing --------------------------------------------------------------------

    def undo(self) -> Message | None:
        """Remove the last exchange (user turn and its answer); return the user turn."""
        if not self.messages:
            return None
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self.messages.pop() if self.messages else None

    def reset(self) -> None:
        self.messages.clear()
        self.last_stats = None

    def set_sampling(self, **changes: Any) -> None:
        self.params = replace(self.params, **changes)

    # -- files ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        data = {"model": self.backend.name, "system": self.system, "messages": self.messages}
        atomic_write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def load(self, path: Path) -> None:
        """Load a file written by /save, or any {"messages": [...]} / [...] of OpenAI messages."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VicunaError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VicunaError(f"cannot read {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise VicunaError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise VicunaError(f"{path} holds no conversation", hint='expected {"messages": [{"role": ..., "content": ...}]}')
        try:
            validate_messages(messages)
        except VicunaError as exc:
            raise VicunaError(f"{path}: {exc.message}", exc.hint) from None
        system = data.get("system") if isinstance(data, dict) else None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        self.system = None if system is None else self.clean(system)
        self.messages = [{"role": m["role"], "content": self.clean(m["content"])} for m in messages]
