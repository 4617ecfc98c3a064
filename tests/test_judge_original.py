"""The original 2023 Vicuna evaluation: its files, the two-score verdict parser, pairwise-scores runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from judge_double import read_rows  # fixtures `double`, `workdir`: conftest.py
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge import answers as answers_mod
from vicuna_cli.judge import judging, results
from vicuna_cli.judge.original import parse_scores, reviewer, scores_prompt
from vicuna_cli.judge.questions import Question, load_bench


@pytest.mark.parametrize("text,expected", [
    ("9 8.5\nAssistant 1 gave a more detailed answer.", (9.0, 8.5)),
    ("9, 8.5", (9.0, 8.5)),
    ("8/10 and 7/10\nBoth are fine.", (8.0, 7.0)),
    ("8 out of 10, 6 out of 10", (8.0, 6.0)),
    ("Assistant 1: 8\nAssistant 2: 9\nAssistant 2 is more precise.", (8.0, 9.0)),
    ("**Assistant 1: 7**\n**Assistant 2: 6.5**", (7.0, 6.5)),
    ("Assistant 1: 8, Assistant 2: 9", (8.0, 9.0)),
    ('{"score_1": 7, "score_2": 4, "explanation": "cut off by max_tok', (7.0, 4.0)),  # schema-constrained, truncated
    ("I'm sorry, but I can't rate these 2 answers.", None),  # a refusal: its "2" is no score
    ("Both answers are good. 8 7", None),  # prose first: the original read only the first line
    ("8", None),
    ("11 3", None),  # off the 1-10 scale
    ("", None),
    (None, None),
])
def test_two_score_parser_on_real_world_first_lines(text, expected):
    assert parse_scores(text) == expected


def test_category_specific_reviewer_prompts():
    q = Question(1, "coding", ["Reverse a list."])
    name, messages = scores_prompt(q, ["xs[::-1]"], ["reversed(xs)"])
    assert name == "vicuna-2023-coding-v1" and "code" in messages[1][1]
    assert "[The Start of Assistant 1's Answer]\nxs[::-1]\n" in messages[1][1] and "Assistant 2's Answer]\nreversed(xs)" in messages[1][1]
    assert "FIRST line" in messages[1][1]
    assert (reviewer("math"), reviewer("writing"), reviewer("fermi")) == ("math", "general", "general")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def table(tmp_path):
    """Hand-made files in fastchat/eval's 2023 schemas (table/question.jsonl, answer/, review/)."""
    t = tmp_path / "table"
    _jsonl(t / "question.jsonl", [
        {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"},
        {"question_id": 2, "text": "Write a C++ program that counts word occurrences in a file.", "category": "coding"},
        {"question_id": 3, "text": "Given f(x) = 5x^3 - 2x + 3, find f(2).", "category": "math"},
    ])
    for model, tag in (("gpt35", "gpt-3.5-turbo:20230327"), ("vicuna-13b", "vicuna-13b:20230322-clean-lang")):
        _jsonl(t / "answer" / f"answer_{model}.jsonl", [
            {"answer_id": f"{model}-a{q}", "model_id": tag, "question_id": q, "text": f"answer {q} of {model}", "metadata": {}} for q in (1, 2, 3)
        ])

    def review(q, text, score, reviewer_id):
        return {"review_id": f"r{q}", "question_id": q, "answer1_id": f"gpt35-a{q}", "answer2_id": f"vicuna-13b-a{q}",
                "reviewer_id": reviewer_id, "text": text, "score": score, "metadata": {}}

    _jsonl(t / "review" / "review_gpt35_vicuna-13b.jsonl", [
        review(1, "9 8.5\nBoth assistants gave helpful tips.", [9.0, 8.5], "gpt-4-0328-default"),
        # FastChat's own parser stored [-1, -1] for this first line; it holds two scores
        review(2, "8/10 and 7/10\nAssistant 2 misses edge cases.", [-1, -1], "gpt-4-0328-coding"),
        # no two numbers on the first line: an error, shown, never averaged in
        review(3, "I cannot compare these answers without the derivation.\n", [-1, -1], "gpt-4-0328-math"),
    ])
    return t


def test_2023_tables_load_unchanged_and_give_the_total_score_ratio(table):
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "questions", "--bench", str(table / "question.jsonl")])
    assert res.exit_code == 0, res.output
    assert "generic (1 questions)" in res.stdout and "How can I improve my time management skills?" in res.stdout
    show = ["judge", "show", str(table / "review" / "review_gpt35_vicuna-13b.jsonl"), "--answers", str(table / "answer"),
            "--bench", str(table / "question.jsonl"), "--bootstrap", "0"]
    res = runner.invoke(app, show + ["--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["judge"] == "gpt-4-0328"
    (pair,) = data["scores"]["pairs"]
    assert (pair["a"], pair["b"]) == ("gpt-3.5-turbo:20230327", "vicuna-13b:20230322-clean-lang")
    assert (pair["a_total"], pair["b_total"], pair["n"], pair["errors"]) == (17.0, 15.5, 2, 1)
    assert pair["ratio"] == pytest.approx(15.5 / 17)
    assert (pair["b_wins"], pair["ties"], pair["a_wins"]) == (0, 0, 2)
    by_cat = {c["category"]: c for c in data["scores"]["categories"]}
    assert (by_cat["generic"]["a_total"], by_cat["generic"]["b_total"]) == (9.0, 8.5)
    assert (by_cat["coding"]["a_total"], by_cat["coding"]["b_total"]) == (8.0, 7.0)
    assert (by_cat["math"]["n"], by_cat["math"]["errors"]) == (0, 1)
    assert data["scores"]["errors"] == [{"question_id": 3, "model_1": "gpt-3.5-turbo:20230327", "model_2": "vicuna-13b:20230322-clean-lang",
                                         "first_line": "I cannot compare these answers without the derivation."}]
    png = table / "scores.png"
    res = runner.invoke(app, show + ["--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vicuna-13b:20230322-clean-lang reaches 91.2% of gpt-3.5-turbo:20230327 (total score 15.5 vs 17 over 2 reviews)" in res.stdout
    assert "unreadable reviews: 1 of 3 records" in res.stdout and "question 3 (" in res.stdout


def test_2023_reviews_need_their_answer_files(table):
    review = table / "review" / "review_gpt35_vicuna-13b.jsonl"
    with pytest.raises(VicunaError, match="a 2023 review names answers, not models") as exc:
        results.summarize([review], rounds=0)
    assert "--answers" in exc.value.hint
    (table / "answer" / "answer_vicuna-13b.jsonl").write_text(json.dumps({"answer_id": "other", "model_id": "v", "question_id": 1, "text": "x"}) + "\n")
    with pytest.raises(VicunaError, match=r"review_gpt35_vicuna-13b.jsonl:1: answer2_id 'vicuna-13b-a1' is in no answer file"):
        results.summarize([review], rounds=0, answers=table / "answer")


class _Fixed(answers_mod.Answerer):
    """A real Answerer whose model always says the same thing (the format is under test, not the model)."""

    name = "fixed"

    def reply(self, messages, temperature, settings):
        return f"fixed answer to: {messages[-1]['content']}"


def test_answer_format_2023_writes_and_reads_the_2023_answer_table(table, tmp_path):
    qs = load_bench(str(table / "question.jsonl"))
    out = tmp_path / "answers"
    path, done, _ = answers_mod.generate_answers(qs, _Fixed(), out, answers_mod.AnswerSettings(format="2023"), model_id="fixed")
    assert path == out / "answer_fixed.jsonl" and done == 3
    rows = read_rows(path)
    assert {k for k in rows[0] if k not in ("bench", "bench_hash")} == {"answer_id", "model_id", "question_id", "text", "metadata"}
    assert rows[1]["text"] == "fixed answer to: Write a C++ program that counts word occurrences in a file."
    # the 2023 files are judged as they are: answer_<model>.jsonl, `text`
    assert answers_mod.available_models(table / "answer") == ["gpt35", "vicuna-13b"]
    loaded = judging.load_model_answers(table / "answer", ["gpt35"], qs[0].bench)
    assert loaded["gpt35"][2] == ["answer 2 of gpt35"]
    res = CliRunner().invoke(app, ["judge", "answer", "--format", "2023", "--bench", "vicuna80", "-m", "x", "--api-base", "http://127.0.0.1:9/v1", "--first-n", "1", "--format", "1999"])
    assert isinstance(res.exception, VicunaError) and "known: 2023, fastchat" in res.exception.message


def test_pairwise_scores_run_with_swap_then_show(double, workdir):  # noqa: F811
    args = ["judge", "--mode", "pairwise-scores", "--pair", "bad", "good", "--answers", str(workdir / "answers"), "-o", str(workdir / "scores"),
            "--bench", str(workdir / "question.jsonl"), "--judge-model", "judge-x", "--judge-api-base", double.base]
    runner = CliRunner()
    res = runner.invoke(app, args + ["--dry-run"])
    assert "6 judgments planned, 6 judge calls" in res.stdout, res.output
    res = runner.invoke(app, args + ["--swap"])
    assert res.exit_code == 0, res.output
    assert double.calls == 12  # 6 question turns, both orders, one call each
    assert all(r["temperature"] == 0.2 and r["response_format"]["json_schema"]["name"] == "pairwise_scores" for r in double.requests)
    rows = read_rows(workdir / "scores" / "judge-x_scores.jsonl")
    assert len(rows) == 12
    plain = next(r for r in rows if r["question_id"] == 1 and not r["swapped"])
    swapped = next(r for r in rows if r["question_id"] == 1 and r["swapped"])
    # model_1 is the answer shown first, score[0] its score; the review is in the original's format
    assert (plain["model_1"], plain["model_2"], plain["score"]) == ("bad", "good", [4, 9])
    assert (swapped["model_1"], swapped["model_2"], swapped["score"]) == ("good", "bad", [9, 4])
    assert plain["text"] == "4 9\nreviewed" and plain["reviewer_id"] == "vicuna-2023-general-v1"
    assert next(r for r in rows if r["question_id"] == 4)["reviewer_id"] == "vicuna-2023-coding-v1"
    assert "good reaches 225.0% of bad (total score 108 vs 48 over 12 reviews)" in res.stdout
    data = results.summarize([workdir / "scores"], rounds=0)["scores"]
    assert data["pairs"][0]["b_wins"] == 12 and data["first_shown_advantage"] == 0.0
    # a position-biased judge: the first answer always wins by 2; --swap shows it and evens it out
    double.mode = "first"
    res = runner.invoke(app, args + ["--swap", "-o", str(workdir / "biased"), "--json"])
    data = json.loads(res.stdout)["scores"]
    assert data["first_shown_advantage"] == 2.0 and data["pairs"][0]["ratio"] == 1.0
    assert (data["pairs"][0]["b_wins"], data["pairs"][0]["a_wins"]) == (6, 6)
    res = runner.invoke(app, ["judge", "--mode", "single", "--swap", "--answers", str(workdir / "answers")])
    assert isinstance(res.exception, VicunaError) and "--swap is for --mode pairwise-scores" in res.exception.message
