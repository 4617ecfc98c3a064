"""`vicuna judge show`: position-swap aggregation, Bradley-Terry, score ratios, FastChat files, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge import results

ELO_3 = 400 * math.log10(3)  # 190.85...


def _pair(qid, m1, m2, g1, g2, judge=("gpt-4", "pair-v2"), **extra):
    """A record exactly as FastChat's play_a_match_pair writes it."""
    return {
        "question_id": qid, "model_1": m1, "model_2": m2, "g1_winner": g1, "g2_winner": g2,
        "judge": list(judge), "g1_user_prompt": "[User Question]\n...", "g1_judgment": "... [[A]]",
        "g2_user_prompt": "[User Question]\n...", "g2_judgment": "... [[B]]", "turn": 1,
        "tstamp": 1687221337.12, **extra,
    }


def _single(qid, model, score, turn=1, judge=("gpt-4", "single-v1")):
    return {
        "question_id": qid, "model": model, "judge": list(judge), "user_prompt": "[Instruction]\n...",
        "judgment": f"Rating: [[{score}]]", "score": score, "turn": turn, "tstamp": 1687221337.5,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIR_ROWS = [
    _pair(81, "alpaca-13b", "vicuna-13b", "model_1", "model_1"),  # consistent: alpaca wins
    _pair(82, "alpaca-13b", "vicuna-13b", "model_1", "model_2"),  # orders disagree: tie
    _pair(83, "alpaca-13b", "vicuna-13b", "tie", "tie"),  # consistent tie
    _pair(84, "alpaca-13b", "vicuna-13b", "error", "model_1"),  # unreadable: error, not scored
    _pair(85, "vicuna-13b", "alpaca-13b", "model_1", "model_1"),  # reversed names: vicuna wins
    {**_pair(86, "alpaca-13b", "vicuna-13b", "x", "x"), "winner": "model_2"},  # FastChat's single-as-pair form
]


def test_position_swap_aggregation():
    table = results.pairwise_tables(PAIR_ROWS, {})
    (pair,) = table["pairs"]
    assert (pair["model_1"], pair["model_2"]) == ("alpaca-13b", "vicuna-13b")
    assert {k: pair[k] for k in ("win", "loss", "tie", "inconsistent", "error")} == {
        "win": 1, "loss": 2, "tie": 2, "inconsistent": 1, "error": 1,
    }
    assert pair["win_rate_adjusted"] == pytest.approx(2 / 5)
    assert pair["position_consistency"] == pytest.approx(3 / 4)  # rows 81, 83, 85 of 81, 82, 83, 85
    assert table["position_consistency"] == pytest.approx(0.75)
    assert table["errors"] == 1
    by_model = {m["model"]: m for m in table["models"]}
    assert (by_model["vicuna-13b"]["win"], by_model["vicuna-13b"]["loss"], by_model["vicuna-13b"]["tie"]) == (2, 1, 2)
    assert results.battles(PAIR_ROWS) == [
        ("alpaca-13b", "vicuna-13b", 1.0), ("alpaca-13b", "vicuna-13b", 0.5), ("alpaca-13b", "vicuna-13b", 0.5),
        ("vicuna-13b", "alpaca-13b", 1.0), ("alpaca-13b", "vicuna-13b", 0.0),
    ]


def _games(spec):
    return [g for a, b, wins, n in spec for g in [(a, b, 1.0)] * wins + [(a, b, 0.0)] * (n - wins)]


def test_bradley_terry_hand_checked_tournament():
    # Strengths 9 : 3 : 1 reproduce these results exactly (9/12 = 3/4, 3/4, 9/10), so they are
    # the maximum-likelihood fit: ratings 1000 +- 400*log10(3) around the mean of 1000.
    games = _games([("A", "B", 3, 4), ("B", "C", 3, 4), ("A", "C", 9, 10)])
    ratings, regularized = results.fit_bt(["A", "B", "C"], games)
    assert not regularized
    assert ratings == pytest.approx([1000 + ELO_3, 1000, 1000 - ELO_3], abs=1e-6)
    rows = results.bradley_terry(games, rounds=100, seed=0)
    assert [r["model"] for r in rows] == ["A", "B", "C"]
    for r in rows:
        assert r["ci_low"] <= r["rating"] <= r["ci_high"]
    assert rows == results.bradley_terry(games, rounds=100, seed=0)  # seeded: reproducible


def test_bradley_terry_ties_and_a_model_that_never_loses():
    ties = [("A", "B", 1.0), ("A", "B", 0.0), ("A", "B", 0.5), ("A", "B", 0.5)]
    assert results.fit_bt(["A", "B"], ties)[0] == pytest.approx([1000, 1000])
    # Ties count half a win each way: 3 wins + 2 ties of 6 = 4 : 2, ratio 2.
    ratings, _ = results.fit_bt(["A", "B"], [("A", "B", 1.0)] * 3 + [("A", "B", 0.5)] * 2 + [("A", "B", 0.0)])
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(2), abs=1e-6)
    # A always wins: no finite MLE, so one virtual tie per pair: 5.5 : 0.5, ratio 11.
    ratings, regularized = results.fit_bt(["A", "B"], [("A", "B", 1.0)] * 5)
    assert regularized
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(11), abs=1e-6)


def test_single_tables_and_total_score_ratio():
    rows = [
        _single(1, "a", 8), _single(1, "b", 4),
        _single(2, "a", 6), _single(2, "b", -1),  # b's verdict was unreadable: counted, not averaged
        _single(3, "a", 10), _single(3, "b", 9),
        _single(3, "a", 5, turn=2), _single(3, "b", 5, turn=2),
    ]
    table = results.single_tables(rows, {1: "math", 2: "math", 3: "writing"})
    a, b = table["models"]
    assert (a["model"], a["score"], a["turn_1"], a["turn_2"], a["n"], a["error"]) == ("a", 7.25, 8.0, 5.0, 4, 0)
    assert (b["model"], b["score"], b["n"], b["error"]) == ("b", 6.0, 3, 1)
    ratio = table["total_score_ratio"]
    assert ratio["reference"] == "a" and ratio["questions"] == 3  # the turns both models have
    assert ratio["ratios"]["b"] == pytest.approx(18 / 23)
    assert table["categories"] == [{"category": "math", "a": 7.0, "b": 4.0}, {"category": "writing", "a": 7.5, "b": 7.0}]
    assert results.single_tables(rows, {}, reference="b")["total_score_ratio"]["ratios"]["a"] == pytest.approx(23 / 18)
    with pytest.raises(VicunaError, match="reference model 'c'"):
        results.single_tables(rows, {}, reference="c")


def test_fastchat_judgment_files_load_unchanged(tmp_path):
    folder = tmp_path / "model_judgment"
    folder.mkdir()
    _write(folder / "gpt-4_pair.jsonl", PAIR_ROWS)
    _write(folder / "gpt-4_single.jsonl", [
        _single(81, "vicuna-13b", 7), _single(81, "alpaca-13b", 4),
        _single(81, "vicuna-13b", 6, turn=2, judge=("gpt-4", "single-v1-multi-turn")),
        _single(81, "alpaca-13b", 2, turn=2, judge=("gpt-4", "single-v1-multi-turn")),
    ])
    questions = tmp_path / "question.jsonl"
    _write(questions, [{"question_id": q, "category": "writing", "turns": ["q1", "q2"]} for q in range(81, 87)])
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "show", str(folder), "--bench", str(questions), "--json", "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["judge"] == "gpt-4"
    assert [(m["model"], m["score"], m["turn_1"], m["turn_2"]) for m in data["single"]["models"]] == [
        ("vicuna-13b", 6.5, 7.0, 6.0), ("alpaca-13b", 3.0, 4.0, 2.0),
    ]
    assert data["single"]["total_score_ratio"]["ratios"]["alpaca-13b"] == pytest.approx(6 / 13)
    assert data["pairwise"]["pairs"][0]["win"] == 1 and data["pairwise"]["errors"] == 1
    assert {c["category"] for c in data["pairwise"]["categories"]} == {"writing"}
    assert [r["model"] for r in data["pairwise"]["bradley_terry"]] == ["vicuna-13b", "alpaca-13b"]
    # the human-readable tables and the plot
    png = tmp_path / "plot.png"
    res = runner.invoke(app, ["judge", "show", str(folder), "--plot", str(png), "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    assert "Total-score ratio to vicuna-13b" in res.stdout and "46.2%" in res.stdout
    assert "position consistency: 75.0%" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_show_pairwise_only_plot_and_errors(tmp_path):
    path = _write(tmp_path / "j_pair.jsonl", PAIR_ROWS)
    png = tmp_path / "bt.png"
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "show", str(path), "--plot", str(png), "--bootstrap", "10"])
    assert res.exit_code == 0, res.output
    assert "Bradley-Terry" in res.stdout and "unreadable verdicts: 1 of 6 records" in res.stdout
    assert png.stat().st_size > 10_000
    # several judges in one place need --judge
    _write(tmp_path / "other_pair.jsonl", [_pair(81, "a", "b", "tie", "tie", judge=("claude-v1", "pair-v2"))])
    with pytest.raises(VicunaError, match="several judges: claude-v1, gpt-4"):
        results.load([tmp_path])
    single, pair = results.load([tmp_path], judge="claude-v1")
    assert (len(single), len(pair)) == (0, 1)
    bad = _write(tmp_path / "bad.jsonl", [{"question_id": 1, "text": "x"}])
    with pytest.raises(VicunaError, match="bad.jsonl:1: not a judgment record"):
        results.load([bad])
    with pytest.raises(VicunaError, match="does not exist"):
        results.load([tmp_path / "nope"])


def _fastchat_show_result(single_files: list[Path], pair_files: list[Path]) -> tuple[dict, dict]:
    """FastChat's show_result.py (display_result_single / _pairwise), transcribed, over the
    concatenation of the files: per-model mean score, and per-model win/loss/tie rates."""
    import pandas as pd

    df = pd.concat([pd.read_json(f, lines=True) for f in single_files])[["model", "score", "turn"]]
    df = df[df["score"] != -1]
    single = df[["model", "score"]].groupby(["model"]).mean()["score"].to_dict()
    df_all = pd.concat([pd.read_json(f, lines=True) for f in pair_files])
    df_all = df_all[(df_all["g1_winner"] != "error") & (df_all["g2_winner"] != "error")]
    list_res = []
    for _, row in df_all.iterrows():
        if row["g1_winner"] == "tie" or row["g1_winner"] != row["g2_winner"]:
            list_res += [{"model": row["model_1"], "win": 0, "loss": 0, "tie": 1}, {"model": row["model_2"], "win": 0, "loss": 0, "tie": 1}]
        else:
            winner, loser = (row["model_1"], row["model_2"]) if row["g1_winner"] == "model_1" else (row["model_2"], row["model_1"])
            list_res += [{"model": winner, "win": 1, "loss": 0, "tie": 0}, {"model": loser, "win": 0, "loss": 1, "tie": 0}]
    table = pd.DataFrame(list_res).groupby(["model"]).sum()
    n = table["win"] + table["loss"] + table["tie"]
    table["win_rate"], table["loss_rate"], table["win_rate_adjusted"] = table["win"] / n, table["loss"] / n, (table["win"] + 0.5 * table["tie"]) / n
    return single, table[["win_rate", "loss_rate", "win_rate_adjusted"]].to_dict("index")


def test_duplicate_judgments_average_like_fastchat_show_result(tmp_path):
    # two runs over overlapping matches: question 1 and 2 are judged in both, differently
    first = [_single(1, "a", 8), _single(1, "b", 4), _single(2, "a", 6), _single(2, "b", 5)]
    second = [_single(1, "a", 4), _single(2, "b", -1), _single(3, "a", 9), _single(3, "b", 7)]
    s1, s2 = _write(tmp_path / "run1_single.jsonl", first), _write(tmp_path / "run2_single.jsonl", second)
    pair1 = [_pair(1, "a", "b", "model_1", "model_1"), _pair(2, "a", "b", "tie", "tie")]
    pair2 = [_pair(1, "b", "a", "model_1", "model_1"), _pair(3, "a", "b", "model_2", "model_2")]  # question 1 again, names swapped
    p1, p2 = _write(tmp_path / "run1_pair.jsonl", pair1), _write(tmp_path / "run2_pair.jsonl", pair2)
    fc_single, fc_pair = _fastchat_show_result([s1, s2], [p1, p2])

    result = results.summarize([s1, s2, p1, p2], rounds=0)
    assert result["duplicates"] == {"policy": "average", "count": 3}  # a on 1, b on 2 (an error is a judgment too), pair on 1
    assert {m["model"]: m["score"] for m in result["single"]["models"]} == pytest.approx(fc_single)
    ours = {m["model"]: {k: m[k] for k in ("win_rate", "loss_rate", "win_rate_adjusted")} for m in result["pairwise"]["models"]}
    assert ours.keys() == fc_pair.keys() and all(ours[m] == pytest.approx(fc_pair[m]) for m in ours)
    # the total-score ratio takes each question turn's mean: a = (8+4)/2 + 6 + 9, b = 4 + 5 + 7
    assert result["single"]["total_score_ratio"]["ratios"]["b"] == pytest.approx(16 / 21)

    last = results.summarize([s1, s2, p1, p2], rounds=0, duplicates="last")
    assert last["duplicates"] == {"policy": "last", "count": 3}
    assert {m["model"]: m["score"] for m in last["single"]["models"]} == {"a": pytest.approx((4 + 6 + 9) / 3), "b": pytest.approx((4 + 7) / 2)}
    assert last["pairwise"]["records"] == 3
    with pytest.raises(VicunaError, match="3 duplicate judgments .*question 1 turn 1 of a") as exc:
        results.summarize([s1, s2, p1, p2], rounds=0, duplicates="error")
    assert "--duplicates average" in exc.value.hint

    res = CliRunner().invoke(app, ["judge", "show", str(tmp_path), "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "3 duplicate judgments averaged" in res.stdout
    res = CliRunner().invoke(app, ["judge", "show", str(tmp_path), "--duplicates", "first"])
    assert isinstance(res.exception, VicunaError) and "known: average, error, last" in res.exception.message


def test_show_refuses_or_remaps_judgments_of_another_question_set(tmp_path):
    from vicuna_cli.judge.questions import load_bench

    builtin = load_bench("vicuna80")
    name, digest = builtin[0].bench
    ours = [{**_pair(q.question_id, "a", "b", "model_1", "model_1"), "category": q.category, "bench": name, "bench_hash": digest} for q in builtin[:2]]
    # the same ids in another set: a copy whose question texts were edited, categories differ
    theirs = [{**_pair(builtin[0].question_id, "a", "c", "model_2", "model_2"), "category": "math", "bench": "edited", "bench_hash": "0123456789abcdef"}]
    _write(tmp_path / "ours_pair.jsonl", ours)
    _write(tmp_path / "theirs_pair.jsonl", theirs)
    with pytest.raises(VicunaError, match=r"judgments of different question sets: edited \(0123456789abcdef\), vicuna80 \(") as exc:
        results.summarize([tmp_path], rounds=0)
    assert "--bench" in exc.value.hint
    # the judge run's own summary never re-maps: the run's questions are the truth
    with pytest.raises(VicunaError, match=r"1 judgments were made on question set edited \(0123456789abcdef\), not vicuna80"):
        results.summarize([tmp_path], builtin, remap=False, rounds=0)
    res = CliRunner().invoke(app, ["judge", "show", str(tmp_path), "--bench", "vicuna80", "--json", "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "1 judgments were made on edited (0123456789abcdef), not on --bench vicuna80" in res.stderr
    data = json.loads(res.stdout)
    assert data["benches"]["remapped"] == 1 and data["benches"]["unknown_ids"] == 0
    cats = {(c["model_1"], c["model_2"], c["category"]) for c in data["pairwise"]["categories"]}
    assert ("a", "c", builtin[0].category) in cats and ("a", "c", "math") not in cats
    # FastChat's vicuna_bench judgments (ids 1-80, no bench recorded) do not land on the built-in set's questions
    _write(tmp_path / "theirs_pair.jsonl", [_pair(1, "a", "c", "tie", "tie")])
    res = CliRunner().invoke(app, ["judge", "show", str(tmp_path), "--bench", "vicuna80", "--json", "--bootstrap", "0"])
    assert "1 judgments have question ids that vicuna80 does not hold: category 'unknown'" in res.stderr
    assert ("a", "c", "unknown") in {(c["model_1"], c["model_2"], c["category"]) for c in json.loads(res.stdout)["pairwise"]["categories"]}
