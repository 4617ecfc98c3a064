"""Chat session: turns, history trimming to the context, undo/regen, save/load."""

from __future__ import annotations

import json

import pytest

from vicuna_cli.chat.backends import LocalBackend
from vicuna_cli.chat.session import ChatSession
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.generate import ContextOverflow, SamplingParams


@pytest.fixture
def session(sp_model_dir):
    backend = LocalBackend(str(sp_model_dir), template=None, device="cpu", dtype="float32")
    notes: list[str] = []
    s = ChatSession(backend, SamplingParams(temperature=0, max_new_tokens=8), notify=notes.append)
    s.notes = notes  # type: ignore[attr-defined]
    return s


def test_turns_alternate_and_use_the_template(session):
    answer = "".join(session.ask("Hello there"))
    assert session.messages == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": answer},
    ]
    assert session.backend.template.name == "vicuna_v1.1"  # no chat template in the SP tokenizer
    "".join(session.ask("how are you?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.last_stats.prompt_tokens > 20


def test_long_history_is_trimmed_from_the_oldest_turn(session):
    limit = session.backend.engine.context_length  # 256 in the fixture model
    session.system = "Hi."
    for i in range(12):
        session.messages += [
            {"role": "user", "content": f"question {i} Paris"},
            {"role": "assistant", "content": f"answer {i} Paris"},
        ]
    "".join(session.ask("last question"))
    prompt = len(session.backend.prompt_ids(session.conversation()[:-1]))
    assert prompt <= limit
    assert session.messages[-2]["content"] == "last question"
    assert session.messages[0]["content"].startswith("question ")
    assert not any(m["content"].startswith("question 0 ") for m in session.messages)
    assert session.notes and "trimmed" in session.notes[0]


def test_a_single_message_too_long_is_refused_and_dropped(session):
    "".join(session.ask("Hello there"))
    before = list(session.messages)
    with pytest.raises(ContextOverflow):
        "".join(session.ask("Paris " * 400))
    assert session.messages == before  # nothing lost: the long message is refused, the history kept
    session.messages.append({"role": "user", "content": "Paris " * 400})
    session.messages.append({"role": "assistant", "content": "ok"})
    with pytest.raises(ContextOverflow):
        "".join(session.regenerate())
    assert session.messages[-1] == {"role": "assistant", "content": "ok"}  # /regen restores the answer


def test_undo_and_regenerate(session):
    first = "".join(session.ask("Hello there"))
    "".join(session.ask("how are you?"))
    removed = session.undo()
    assert removed == {"role": "user", "content": "how are you?"}
    assert len(session.messages) == 2
    again = "".join(session.regenerate())
    assert again == first  # greedy: the same answer again
    assert len(session.messages) == 2
    session.reset()
    assert session.undo() is None
    with pytest.raises(VicunaError, match="no answer to regenerate"):
        session.regenerate()


def test_interrupted_answer_keeps_the_turn(session):
    session.params = SamplingParams(temperature=0, max_new_tokens=50)
    stream = session.ask("Hello there")
    next(iter(stream))
    stream.close()  # what Ctrl-C in the REPL does
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.last_stats.finish_reason == "cancelled"


def test_save_and_load(session, tmp_path):
    session.system = "Be brief."
    "".join(session.ask("Hello there"))
    path = tmp_path / "chat.json"
    session.save(path)
    saved = json.loads(path.read_text())
    assert saved["system"] == "Be brief." and saved["messages"] == session.messages
    messages = list(session.messages)
    session.reset()
    session.system = None
    session.load(path)
    assert session.messages == messages and session.system == "Be brief."


@pytest.mark.parametrize(
    "content, error",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON: .* line 1"),
        ('{"messages": "nope"}', "holds no conversation"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
        ("\udcff", "cannot read|not valid JSON"),
    ],
)
def test_load_bad_files_is_a_clear_error_and_keeps_the_conversation(session, tmp_path, content, error):
    "".join(session.ask("Hello there"))
    before = list(session.messages)
    path = tmp_path / "bad.json"
    if content == "\udcff":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif content is not None:
        path.write_text(content)
    with pytest.raises(VicunaError, match=error):
        session.load(path)
    assert session.messages == before


def test_load_accepts_a_plain_list_of_openai_messages(session, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    session.load(path)
    assert session.system == "S" and len(session.messages) == 2
