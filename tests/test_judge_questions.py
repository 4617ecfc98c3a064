"""Question sets (built-in and FastChat files) and resumable answer generation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge import answers as answers_mod
from vicuna_cli.judge.questions import load_bench

MT_BENCH_LINES = [  # the shape of FastChat's data/mt_bench/question.jsonl (text shortened)
    {"question_id": 81, "category": "writing", "turns": ["Compose an engaging travel blog post about a recent trip to Hawaii.", "Rewrite your previous response. Start every sentence with the letter A."]},
    {"question_id": 111, "category": "math", "turns": ["The vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of the triangle?", "What's area of the circle circumscribing the triangle?"]},
    {"question_id": 101, "category": "reasoning", "turns": ["Imagine you are participating in a race with a group of people. If you have just overtaken the second person, what's your current position?", "If the \"second person\" is changed to \"last person\" in the above question, what would the answer be?"], "reference": ["You are in second place.", "Uncertain."]},
]
GPT4_REFERENCE = [  # data/mt_bench/reference_answer/gpt-4.jsonl, same schema as model answers
    {"question_id": 111, "answer_id": "NJPTPe2PZ7547UMekB9kBM", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["The area is 3.", "The area is 5 pi."]}], "tstamp": 1686287200.24},
    {"question_id": 101, "answer_id": "abc", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["second", "second to last"]}], "tstamp": 1686287200.25},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_builtin_set_has_80_questions_in_8_categories_with_references():
    qs = load_bench("vicuna80")
    # string ids: FastChat's vicuna_bench numbers other questions 1-80, and its judgments must not map onto these
    assert len(qs) == 80 and [q.question_id for q in qs] == [f"vicuna80-{i:02d}" for i in range(1, 81)]
    assert Counter(q.category for q in qs) == {c: 10 for c in (
        "writing", "roleplay", "common-sense", "fermi", "counterfactual", "knowledge", "coding", "math")}
    assert {q.category for q in qs if q.reference} == {"coding", "math"}
    assert all(q.reference for q in qs if q.category in ("coding", "math"))
    assert load_bench(None)[0].turns == qs[0].turns  # the default


def test_fastchat_bench_dir_loads_unchanged_with_references(tmp_path):
    bench = tmp_path / "mt_bench"
    _jsonl(bench / "question.jsonl", MT_BENCH_LINES)
    _jsonl(bench / "reference_answer" / "gpt-4.jsonl", GPT4_REFERENCE)
    qs = {q.question_id: q for q in load_bench(str(bench))}
    assert qs[81].turns[1].startswith("Rewrite your previous response") and qs[81].reference is None
    assert qs[111].reference == ["The area is 3.", "The area is 5 pi."]  # from the reference file
    assert qs[111].reference_source == "reference_answer/gpt-4.jsonl"
    assert [q.question_id for q in load_bench(str(bench / "question.jsonl"))] == [81, 111, 101]


def test_reference_answers_follow_fastchat_gen_judgment(tmp_path):
    bench = tmp_path / "mt_bench"
    inline_only = {"question_id": 130, "category": "coding", "turns": ["Reverse a list."], "reference": ["xs[::-1]"]}
    _jsonl(bench / "question.jsonl", MT_BENCH_LINES + [inline_only])
    _jsonl(bench / "reference_answer" / "gpt-4.jsonl", GPT4_REFERENCE)
    _jsonl(bench / "reference_answer" / "claude-v1.jsonl", [{**GPT4_REFERENCE[1], "choices": [{"index": 0, "turns": ["claude says second", "-"]}]}])
    qs = {q.question_id: q for q in load_bench(str(bench))}
    # the reference model's answer wins over the question's short inline reference (FastChat's source)
    assert qs[101].reference == ["second", "second to last"] and qs[101].reference_source == "reference_answer/gpt-4.jsonl"
    # the inline reference only where the file has no entry
    assert qs[130].reference == ["xs[::-1]"] and qs[130].reference_source == "inline"
    qs = {q.question_id: q for q in load_bench(str(bench), ref_model="claude-v1")}
    assert qs[101].reference == ["claude says second", "-"] and qs[101].reference_source == "reference_answer/claude-v1.jsonl"
    assert qs[111].reference is None  # claude-v1 has no answer for it, and it has no inline one
    with pytest.raises(VicunaError, match="has no gpt-3.5-turbo.jsonl; reference models there: claude-v1, gpt-4") as exc:
        load_bench(str(bench), ref_model="gpt-3.5-turbo")
    assert exc.value.hint == "pick one with --ref-model claude-v1"


@pytest.mark.parametrize("row,message", [
    ({"question_id": 7, "category": "poetry", "turns": ["x"]}, "question 7 has unknown category 'poetry'"),
    ({"question_id": 7, "category": "math"}, "question 7 has no 'turns'"),
    ({"question_id": 7, "category": "math", "turns": []}, "question 7 has no 'turns'"),
    ({"question_id": 7, "category": "math", "turns": ["ok", ""]}, "question 7 has no 'turns'"),
    ({"category": "math", "turns": ["x"]}, "the question has no 'question_id'"),
    ("{not json", r"q.jsonl:1: not valid JSON"),
])
def test_bad_question_files(tmp_path, row, message):
    path = _jsonl(tmp_path / "q.jsonl", [row])
    with pytest.raises(VicunaError, match=message) as exc:
        load_bench(str(path))
    if "category" in message:
        assert "known categories: writing, roleplay" in exc.value.hint


def test_bad_bench_names(tmp_path):
    with pytest.raises(VicunaError, match="no question set 'mt-bench-9'") as exc:
        load_bench("mt-bench-9")
    assert "vicuna80" in exc.value.hint
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VicunaError, match="has no question.jsonl"):
        load_bench(str(tmp_path / "empty_dir"))
    dup = _jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "category": "math", "turns": ["a"]}] * 2)
    with pytest.raises(VicunaError, match="duplicate question ids: 1"):
        load_bench(str(dup))


def test_questions_command(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "questions"])
    assert res.exit_code == 0
    assert "math (10 questions, 10 with reference answers)" in res.stdout
    assert "writing (10 questions)" in res.stdout
    path = _jsonl(tmp_path / "mt" / "question.jsonl", MT_BENCH_LINES)
    res = runner.invoke(app, ["judge", "questions", "--bench", str(path), "--json"])
    assert [json.loads(line) for line in res.stdout.splitlines()] == MT_BENCH_LINES
    res = runner.invoke(app, ["judge", "questions", "--bench", str(path)])
    assert "[2 turns]" in res.stdout


def test_local_answers_multi_turn_fastchat_format_resumable(tmp_path, sp_model_dir):
    bench = _jsonl(tmp_path / "question.jsonl", MT_BENCH_LINES)
    qs = load_bench(str(bench))
    answerer = answers_mod.LocalAnswerer(str(sp_model_dir))
    seen: list[list[dict]] = []
    original = answerer.reply

    def counting(messages, temperature, settings):
        seen.append([dict(m) for m in messages])
        return original(messages, temperature, settings)

    answerer.reply = counting
    settings = answers_mod.AnswerSettings(max_new_tokens=5)
    out = tmp_path / "model_answer"
    path, done, skipped = answers_mod.generate_answers(qs[:2], answerer, out, settings, model_id="tiny/sp:v1")
    assert path == out / "tiny_sp_v1.jsonl" and (done, skipped) == (2, 0)
    assert len(seen) == 4  # two questions, two turns each
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]  # turn 2 sees turn 1's answer
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "bench", "bench_hash"}
    assert (rows[0]["bench"], rows[0]["bench_hash"]) == qs[0].bench == (tmp_path.name, qs[1].bench[1])
    assert rows[0]["model_id"] == "tiny/sp:v1" and len(rows[0]["choices"][0]["turns"]) == 2
    assert rows[0]["choices"][0]["turns"][0] == seen[1][1]["content"]  # what turn 2 was shown
    # resume: only the missing question is answered; the file stays one record per question, sorted
    seen.clear()
    path, done, skipped = answers_mod.generate_answers(qs, answerer, out, settings, model_id="tiny/sp:v1")
    assert (done, skipped) == (1, 2) and len(seen) == 2
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [81, 101, 111]
    assert answers_mod.available_models(out) == ["tiny_sp_v1"]
    assert set(answers_mod.load_answers(path)) == {81, 101, 111}


def test_answers_record_their_bench_and_other_benches_are_refused(tmp_path):
    one = _jsonl(tmp_path / "one" / "question.jsonl", MT_BENCH_LINES)
    edited = [{**MT_BENCH_LINES[0], "turns": ["A different question under the same id.", "x"]}] + MT_BENCH_LINES[1:]
    two = _jsonl(tmp_path / "two" / "question.jsonl", edited)
    q1, q2 = load_bench(str(one)), load_bench(str(two))
    assert q1[0].bench[0] == "one" and q2[0].bench[0] == "two"
    assert q1[0].bench[1] != q2[0].bench[1]  # one question's text differs: another set
    assert load_bench(str(tmp_path / "one"))[0].bench[1] == q1[0].bench[1]  # the same questions, as a dir
    assert load_bench("vicuna80")[0].bench[0] == "vicuna80"
    path = _jsonl(tmp_path / "answers" / "m.jsonl", [
        {"question_id": 81, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "b"]}], "bench": "one", "bench_hash": q1[0].bench[1]},
    ])
    assert answers_mod.load_answers(path, q1[0].bench) == {81: ["a", "b"]}
    with pytest.raises(VicunaError, match=r"m.jsonl answers bench 'one' \(questions hash \w+\), not 'two'") as exc:
        answers_mod.load_answers(path, q2[0].bench)
    assert "-o" in exc.value.hint
    # FastChat's answer files record no bench: they load
    fastchat = _jsonl(tmp_path / "answers" / "f.jsonl", [{"question_id": 81, "choices": [{"index": 0, "turns": ["a"]}]}])
    assert answers_mod.load_answers(fastchat, q2[0].bench) == {81: ["a"]}
