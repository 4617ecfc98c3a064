"""The interactive chat REPL: prompt-toolkit for input, rich for streamed Markdown answers."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable, Iterable, Iterator

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.live import Live
from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from ..core import console
from ..core.errors import VicunaError
from ..core.generate import GenerationStats
from ..core.store import vicuna_home
from .runner import ChatConfig, make_backend, print_stats
from .session import ChatSession

HELP = {
    "/help": "show this help",
    "/reset": "start a new conversation (keeps the system message)",
    "/regen": "answer the last message again",
    "/undo": "remove the last question and its answer",
    "/system": "/system TEXT sets the system message; /system alone shows it",
    "/save": "/save FILE writes the conversation as JSON",
    "/load": "/load FILE reads a conversation written by /save",
    "/model": "/model shows what is answering; /model NAME switches model",
    "/stats": "speed and token counts of the last answer",
    "/exit": "leave (Ctrl-D works too)",
}


class AnswerMarkdown(Markdown):
    """An answer rendered as Markdown, except that a single newline is a line break: models write
    poems, addresses and lists without bullets one line each, and CommonMark's soft break would
    join those lines into one paragraph. Code blocks, lists and tables render as usual."""

    def __init__(self, markup: str, **kwargs) -> None:
        super().__init__(markup, **kwargs)
        _hard_breaks(self.parsed)


def _hard_breaks(tokens) -> None:
    for token in tokens:
        if token.type == "softbreak":
            token.type = "hardbreak"
        if token.children:
            _hard_breaks(token.children)


def stats_table(stats: GenerationStats) -> Table:
    """The last answer's figures as a small two-column table (for /stats, on stderr)."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="dim")
    table.add_column(justify="right")
    ttft = f"{stats.time_to_first_token:.2f} s" if stats.time_to_first_token is not None else "-"
    rows = [
        ("first token", ttft),
        ("decode speed", f"{stats.tokens_per_second:.1f} tok/s"),
        ("prompt tokens", str(stats.prompt_tokens)),
        ("  from the prefix cache", str(stats.cached_tokens)),
        ("output tokens", str(stats.output_tokens)),
        ("total time", f"{stats.total_time:.2f} s"),
        ("finish reason", stats.finish_reason or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


class SlashCompleter(Completer):
    """Completes /commands, and file paths after /save and /load."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event):  # type: ignore[override]
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            for name, description in HELP.items():
                if name.startswith(text):
                    yield Completion(name, start_position=-len(text), display_meta=description)
        elif text.split(" ", 1)[0] in ("/save", "/load"):
            sub = Document(text.split(" ", 1)[1])
            yield from self.paths.get_completions(sub, complete_event)


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Alt-Enter / Esc Enter: a newline instead of sending
    def _(event) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


class Repl:
    def __init__(self, session: ChatSession, config: ChatConfig):
        self.session = session
        self.config = config
        history = vicuna_home() / "chat_history"
        history.parent.mkdir(parents=True, exist_ok=True)
        self.prompt = PromptSession(
            history=FileHistory(str(history)),
            completer=SlashCompleter(),
            complete_while_typing=True,
            key_bindings=_key_bindings(),
        )
        self.commands: dict[str, Callable[[str], None]] = {
            "/help": self.cmd_help,
            "/reset": self.cmd_reset,
            "/regen": self.cmd_regen,
            "/undo": self.cmd_undo,
            "/system": self.cmd_system,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/model": self.cmd_model,
            "/stats": self.cmd_stats,
            "/exit": self.cmd_exit,
            "/quit": self.cmd_exit,
        }
        self.running = True

    def run(self) -> None:
        backend = self.session.backend.describe()
        console.err.print(
            f"[bold]vicuna chat[/bold] · {backend['model']} · {backend.get('template', backend.get('api_base'))}"
            "  [dim](/help for commands, Alt-Enter or \"\"\" for multi-line, Ctrl-D to exit)[/dim]"
        )
        while self.running:
            try:
                text = self.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                continue
            except EOFError:  # Ctrl-D
                break
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    self.dispatch(text)
                else:
                    self.stream(self.session.ask(text))
            except VicunaError as exc:
                console.print_error(exc.message, exc.hint)

    def read(self) -> str:
        text = self.prompt.prompt("» ")
        if not text.lstrip().startswith('"""'):
            return text
        # A block: everything up to a line that ends with """.
        body = text.lstrip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            line = self.prompt.prompt("… ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    def stream(self, deltas: Iterator[str]) -> None:
        text = ""
        try:
            with Live(AnswerMarkdown(""), console=console.out, refresh_per_second=12, vertical_overflow="visible") as live:
                for delta in deltas:
                    text += delta
                    live.update(AnswerMarkdown(text))
        except KeyboardInterrupt:
            deltas.close()  # type: ignore[attr-defined]  # stops generation; the partial turn is kept
            console.err.print("[yellow](stopped)[/yellow]")
        print_stats(self.session.last_stats)

    def dispatch(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            raise VicunaError(f"unknown command {name!r}", hint="commands: " + ", ".join(HELP))
        handler(arg.strip())

    # -- commands ---------------------------------------------------------------------------

    def cmd_help(self, _: str) -> None:
        for name, description in HELP.items():
            console.err.print(f"  [bold]{name:<8}[/bold] {description}")

    def cmd_reset(self, _: str) -> None:
        self.session.reset()
        console.info("new conversation")

    def cmd_regen(self, _: str) -> None:
        self.stream(self.session.regenerate())

    def cmd_undo(self, _: str) -> None:
        removed = self.session.undo()
        console.info(f"removed: {removed['content'][:60]!r}" if removed else "nothing to undo")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.session.system = self.session.clean(arg)
            console.info("system message set")
        else:
            console.err.print(self.session.system or "(the template's default system message)", markup=False)

    def cmd_save(self, arg: str) -> None:
        path = Path(_one_path(arg, "/save")).expanduser()
        self.session.save(path)
        console.info(f"saved {len(self.session.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        path = Path(_one_path(arg, "/load")).expanduser()
        self.session.load(path)
        console.info(f"loaded {len(self.session.messages)} messages from {path}")
        _replay(self.session.messages)

    def cmd_model(self, arg: str) -> None:
        if arg:
            self.session.backend = make_backend(self.config, model=arg)
        console.err.print(json.dumps(self.session.backend.describe(), indent=2), markup=False)

    def cmd_stats(self, _: str) -> None:
        stats = self.session.last_stats
        if stats is None:
            console.info("no answer yet")
        else:
            console.err.print(stats_table(stats))

    def cmd_exit(self, _: str) -> None:
        self.running = False


def _one_path(arg: str, command: str) -> str:
    parts = shlex.split(arg) if arg else []
    if len(parts) != 1:
        raise VicunaError(f"{command} needs one file name", hint=f"{command} chat.json")
    return parts[0]


def _replay(messages: Iterable[dict]) -> None:
    for message in messages:
        who = "you" if message["role"] == "user" else "assistant"
        console.err.print(Text.assemble((f"{who}: ", "dim"), message["content"]))
