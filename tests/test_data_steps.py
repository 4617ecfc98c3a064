"""`vicuna data clean` step by step: what each step keeps, drops and counts (in-process, one worker)."""

from __future__ import annotations

import json

import pytest
from data_helpers import conv, run_clean, turns, write_jsonl

from vicuna_cli.core.errors import VicunaError

HTML_ANSWER = '<div class="markdown prose w-full break-words dark:prose-invert light"><p>I am <strong>fine</strong>, thank you for asking.</p></div>'


def step(report, name):
    return next(s for s in report["steps"] if s["step"] == name)


def test_html_step_converts_exported_turns_and_counts_them(tmp_path):
    records = [conv("a", ("human", "How are you today, my friend?"), ("gpt", HTML_ANSWER))]
    rows, report = run_clean(tmp_path, records)
    assert turns(rows[0])[1] == ("gpt", "I am **fine**, thank you for asking.")
    assert step(report, "html")["notes"] == {"turns changed": 1}
    rows, report = run_clean(tmp_path, records, html=False)
    assert turns(rows[0])[1] == ("gpt", HTML_ANSWER)
    assert step(report, "html")["enabled"] is False


def test_empty_turns_are_removed_and_the_roles_step_merges_what_touches(tmp_path):
    records = [conv("a", ("human", "Question one, please?"), ("gpt", "  \n "), ("human", "Question two, please?"), ("gpt", "Answer two."))]
    rows, report = run_clean(tmp_path, records)
    assert turns(rows[0]) == [("human", "Question one, please?\n\nQuestion two, please?"), ("gpt", "Answer two.")]
    assert step(report, "empty")["notes"] == {"turns removed": 1}
    assert step(report, "roles")["notes"] == {"turns merged": 1}


def test_roles_are_normalised_and_each_change_is_counted(tmp_path):
    records = [
        conv("lead", ("gpt", "An answer without a question."), ("human", "What is two plus two?"), ("gpt", "Four.")),
        conv("merge", ("user", "First part."), ("human", "Second part."), ("assistant", "Both answered."), ("human", "Unanswered?")),
        conv("sys", ("system", "Answer briefly."), ("human", "Name a colour, please."), ("gpt", "Blue."), ("system", "Late system.")),
    ]
    rows, report = run_clean(tmp_path, records)
    assert [turns(r) for r in rows] == [
        [("human", "What is two plus two?"), ("gpt", "Four.")],
        [("human", "First part.\n\nSecond part."), ("gpt", "Both answered.")],
        [("system", "Answer briefly."), ("human", "Name a colour, please."), ("gpt", "Blue.")],
    ]
    assert step(report, "roles")["notes"] == {
        "leading assistant turns dropped": 1, "turns merged": 1, "trailing user turns dropped": 1,
        "late system turns dropped": 1,
    }
    assert [step(report, "roles")[k] for k in ("in", "out")] == [3, 3]


def test_length_filter_drops_too_few_answers_or_characters(tmp_path):
    records = [
        conv("short", ("human", "hi"), ("gpt", "yo")),
        conv("question-only", ("human", "Is anyone there at all?")),
        conv("one", ("human", "Tell me a fact about cats."), ("gpt", "Cats sleep a lot.")),
        conv("two", ("human", "Tell me a fact about dogs."), ("gpt", "Dogs like walks."), ("human", "Another?"), ("gpt", "They can smell well.")),
    ]
    rows, report = run_clean(tmp_path, records)
    assert [r["id"] for r in rows] == ["one", "two"]
    assert step(report, "length")["dropped"] == {"fewer than 16 characters": 1, "fewer than 1 assistant turn": 1}
    rows, report = run_clean(tmp_path, records, min_turns=2, min_chars=0)
    assert [r["id"] for r in rows] == ["two"]
    assert step(report, "length")["dropped"] == {"fewer than 2 assistant turns": 3}


def test_blocklist_file_and_the_original_preset(tmp_path):
    records = [
        conv("brand", ("human", "Are you ChatGPT, made by a lab?"), ("gpt", "I am an assistant.")),
        conv("pizza", ("human", "Do you like Pineapple   Pizza?"), ("gpt", "Pineapple pizza is divisive.")),
        conv("ok", ("human", "What is the capital of France?"), ("gpt", "Paris is the capital.")),
    ]
    rows, _ = run_clean(tmp_path, records)
    assert len(rows) == 3  # no blocklist unless asked for
    phrases = tmp_path / "block.txt"
    phrases.write_text("# phrases, one a line\npineapple pizza\n\nPINEAPPLE   PIZZA\n")
    rows, report = run_clean(tmp_path, records, blocklist=[phrases], blocklist_preset="original")
    assert [r["id"] for r in rows] == ["ok"]
    assert step(report, "blocklist")["dropped"] == {"mentions 'chatgpt'": 1, "mentions 'pineapple   pizza'": 1}
    with pytest.raises(VicunaError, match="unknown blocklist preset 'nope'; known: original"):
        run_clean(tmp_path, records, blocklist_preset="nope")


def test_language_filter_keeps_the_listed_languages(tmp_path):
    records = [
        conv("en", ("human", "Could you explain how photosynthesis works in plants?"), ("gpt", "Plants turn light, water and carbon dioxide into sugar and oxygen.")),
        conv("ko", ("human", "안녕하세요 반갑습니다. 오늘 날씨가 어때요? 한국어로 대답해 주세요."), ("gpt", "오늘은 맑고 따뜻한 날씨입니다. 산책하기 좋은 날이에요.")),
        conv("zh", ("human", "你好，请用中文介绍一下北京的历史和文化。"), ("gpt", "北京是中国的首都，有三千多年的历史，文化非常丰富。")),
    ]
    rows, report = run_clean(tmp_path, records, lang="en,ko")
    assert [r["id"] for r in rows] == ["en", "ko"]
    assert step(report, "lang")["dropped"] == {"language zh": 1}
    assert report["languages"] == {"en": 1, "ko": 1, "zh": 1}
    with pytest.raises(VicunaError, match="unknown language code for --lang 'xx'"):
        run_clean(tmp_path, records, lang="en,xx")


def test_dedup_by_id_and_by_normalised_first_exchange(tmp_path):
    first = conv("a", ("human", "Hello there, how are you?"), ("gpt", HTML_ANSWER))
    records = [
        first,
        conv("a", ("human", "A different question, same id?"), ("gpt", "A different answer.")),
        conv("b", ("human", "  HELLO there,\n how are you?"), ("gpt", HTML_ANSWER.replace("fine", "FINE")), ("human", "More?"), ("gpt", "No.")),
        conv("c", ("human", "Hello there, how are you?"), ("gpt", "A new answer to an old question.")),
    ]
    rows, report = run_clean(tmp_path, records)
    assert [r["id"] for r in rows] == ["a", "c"]
    assert step(report, "dedup")["dropped"] == {"same id": 1, "same first exchange": 1}
    rows, report = run_clean(tmp_path, records, dedup=False)
    assert len(rows) == 4


def test_wrong_shape_records_are_skipped_with_reasons_or_fail_under_strict(tmp_path):
    records = [
        conv("ok", ("human", "What is the capital of Italy?"), ("gpt", "Rome is the capital.")),
        42,
        {"id": "no-list", "conversations": "hello"},
        conv("bot", ("bot", "beep"), ("gpt", "boop")),
        {"id": "no-value", "conversations": [{"from": "human"}]},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    rows, report = run_clean(tmp_path, source)
    assert [r["id"] for r in rows] == ["ok"]
    assert step(report, "read") | {"notes": None} == {
        "step": "read", "enabled": True, "in": 5, "out": 1, "notes": None,
        "dropped": {"not a JSON object": 1, "no 'conversations' list": 1, "unknown role 'bot'": 1, "turn 0 has no 'value' string": 1},
    }
    with pytest.raises(VicunaError, match=r"in.jsonl record 2 \(line 2\) has the wrong shape: not a JSON object"):
        run_clean(tmp_path, source, strict=True)


def test_report_chains_counts_and_writes_json(tmp_path):
    records = [conv(f"c{i}", ("human", f"Question number {i} about cats?"), ("gpt", "Cats are fine animals.")) for i in range(5)]
    records.append(conv("c0", ("human", "dup id"), ("gpt", "dup answer here")))
    report_path = tmp_path / "report.json"
    rows, report = run_clean(tmp_path, records, report=report_path)
    assert json.loads(report_path.read_text()) == report | {"seconds": json.loads(report_path.read_text())["seconds"]}
    ins = [s["in"] for s in report["steps"] if s["enabled"]]
    outs = [s["out"] for s in report["steps"] if s["enabled"]]
    assert ins[1:] == outs[:-1] and outs[-1] == report["records_out"] == len(rows) == 5
    assert report["length_unit"] == "characters" and sum(report["histogram"].values()) == 5
