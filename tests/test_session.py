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


# -- fitting a long history (issue #18, item 10) ------------------------------------------------


def _one_at_a_time(session: ChatSession) -> int:
    """The rule before the binary search, kept as the reference: drop the oldest exchange and
    re-render until the prompt fits; ContextOverflow when only the newest message is left."""
    limit = session.backend.engine.context_length
    reserve = min(64, session.params.max_new_tokens)
    kept, dropped = list(session.messages), 0
    while True:
        prompt = len(session.backend.prompt_ids(session.conversation(kept)))
        if prompt + reserve <= limit:
            return dropped
        if len(kept) <= 1:
            raise ContextOverflow(prompt, limit, reserve)
        del kept[:2]
        dropped += 1


def _history(rng, exchanges: int) -> list[dict]:
    words = ["Paris", "hello", "how are you", "fine", "안녕하세요", "🙂", "café"]
    messages = []
    for i in range(exchanges):
        messages.append({"role": "user", "content": f"q{i} " + " ".join(rng.choices(words, k=rng.randint(0, 25)))})
        messages.append({"role": "assistant", "content": f"a{i} " + " ".join(rng.choices(words, k=rng.randint(0, 25)))})
    return messages


@pytest.mark.parametrize("model", ["sp", "bpe"])  # a fixed template and a Jinja chat template
def test_fitting_drops_exactly_what_dropping_one_at_a_time_dropped(model, sp_model_dir, bpe_model_dir):
    import random

    backend = LocalBackend(str(sp_model_dir if model == "sp" else bpe_model_dir), template=None, device="cpu", dtype="float32")
    rng = random.Random(7)
    outcomes = set()
    for case in range(40):
        notes: list[str] = []
        session = ChatSession(backend, SamplingParams(max_new_tokens=rng.choice([1, 16, 64, 200])), notify=notes.append,
                              system=rng.choice([None, "Be brief.", "Paris " * 30]))
        session.messages = _history(rng, rng.randint(0, 12))
        session.messages.append({"role": "user", "content": "last " + "Paris " * rng.choice([0, 5, 120, 400])})
        before = list(session.messages)
        try:
            want = _one_at_a_time(session)
        except ContextOverflow as exc:
            with pytest.raises(ContextOverflow) as got:
                session._fit_context()
            assert got.value.message == exc.message
            assert session.messages == before
            outcomes.add("overflow")
            continue
        session._fit_context()
        assert session.messages == before[2 * want:], f"case {case}"
        assert bool(notes) == (want > 0) and (not notes or f"dropped the {want} oldest" in notes[0])
        outcomes.add("kept" if want == 0 else "dropped")
    assert outcomes == {"kept", "dropped", "overflow"}  # the cases cover every outcome


def test_a_long_loaded_history_takes_a_logarithmic_number_of_renders(bpe_model_dir):
    """2,000 exchanges (as after /load): a handful of full chat-template renders, not one per
    exchange dropped (each of those also rendered every assistant turn again for its span)."""
    import math
    import random

    backend = LocalBackend(str(bpe_model_dir), template=None, device="cpu", dtype="float32")
    tokenizer = backend.template.tokenizer
    assert backend.template.name == "auto"  # the Jinja chat template: the costly kind of render
    budget = 2 + math.ceil(math.log2(2001))
    renders = []
    real = tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        renders.append(len(args[0]))
        if len(renders) > budget:  # fail at once instead of rendering for minutes
            raise AssertionError(f"more than {budget} renders")
        return real(*args, **kwargs)

    tokenizer.apply_chat_template = counting
    try:
        session = ChatSession(backend, SamplingParams(max_new_tokens=8), notify=lambda message: None)
        session.messages = _history(random.Random(1), 2000) + [{"role": "user", "content": "and now?"}]
        session._fit_context()
    finally:
        del tokenizer.apply_chat_template
    assert len(renders) <= budget
    assert 1 <= len(session.messages) < 4001 and session.messages[-1]["content"] == "and now?"
    assert len(backend.prompt_ids(session.conversation())) + 8 <= backend.engine.context_length


def test_ctrl_c_while_fitting_leaves_the_history_as_it_was(session):
    session.messages = _history(__import__("random").Random(2), 40)
    before = list(session.messages)
    calls = []
    real = session.backend.prompt_ids

    def interrupted(messages):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(messages)

    session.backend.prompt_ids = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            "".join(session.ask("a new question"))
    finally:
        del session.backend.prompt_ids
    assert session.messages == before  # nothing dropped, and the unanswered question taken back
