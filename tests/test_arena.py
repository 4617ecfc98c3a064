"""The arena's record and its analysis, without servers: the battle store (one vote per battle, by
its client, only once answered; racing votes), anonymised clients, the rate limiter (on an
injected clock), FastChat's battle export, ratings through the same code as LLM verdicts, the
agreement arithmetic, and `vicuna judge --battles` against the scripted judge double."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge import arena, results
from vicuna_cli.serve.arena_store import ArenaStore, RateLimiter, VoteRefused

FASTCHAT_FIELDS = {"question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b",
                   "turn", "anony", "language", "tstamp"}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _refused(store: ArenaStore, battle_id: str, client: str, vote: str = "a") -> str:
    with pytest.raises(VoteRefused) as refused:
        store.vote(battle_id, client, vote)
    return refused.value.reason


def test_a_battle_takes_one_vote_from_its_own_client_once_answered(tmp_path):
    clock = Clock()
    store = ArenaStore(tmp_path / "arena.sqlite3", clock)
    me, other = store.client_id("127.0.0.1"), store.client_id("10.0.0.9")
    battle = store.create(me, "alpha", "beta", "Hi?")
    assert _refused(store, battle, me) == "unfinished"  # nothing to judge yet
    store.finish(battle, "answer of alpha", "answer of beta")
    assert _refused(store, battle, other) == "unknown"  # someone else's battle is as good as none
    assert _refused(store, "battle-made-up", me) == "unknown"  # a forged id
    clock.t = 1005.0
    row = store.vote(battle, me, "bothbad")
    assert (row["model_a"], row["model_b"], row["vote"], row["voted"]) == ("alpha", "beta", "tie (bothbad)", 1005.0)
    assert _refused(store, battle, me, "a") == "already_voted"
    store.finish(battle, "rewritten", "rewritten")  # answers are fixed once stored
    store.close()
    reopened = ArenaStore(tmp_path / "arena.sqlite3")  # durable: a new connection sees the vote
    kept = reopened.get(battle)
    assert (kept["prompt"], kept["answer_a"], kept["answer_b"], kept["vote"]) == ("Hi?", "answer of alpha", "answer of beta", "tie (bothbad)")
    assert reopened.client_id("127.0.0.1") == me  # the salt is kept with the data: ids stay stable


def test_racing_votes_store_exactly_one(tmp_path):
    store = ArenaStore(tmp_path / "arena.sqlite3")
    me = store.client_id("127.0.0.1")
    battle = store.create(me, "alpha", "beta", "Hi?")
    store.finish(battle, "x", "y")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def vote(choice: str) -> None:
        barrier.wait(timeout=30)
        try:
            outcomes.append("stored:" + store.vote(battle, me, choice)["vote"])
        except VoteRefused as refused:
            outcomes.append(refused.reason)

    threads = [threading.Thread(target=vote, args=(c,)) for c in ["a", "b", "tie", "bothbad"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    stored = [o for o in outcomes if o.startswith("stored:")]
    assert len(outcomes) == 8 and len(stored) == 1 and outcomes.count("already_voted") == 7
    assert store.get(battle)["vote"] == stored[0].split(":", 1)[1]


def test_clients_are_keyed_hashes_never_addresses(tmp_path):
    store = ArenaStore(tmp_path / "a.sqlite3")
    ip = "203.0.113.77"
    client = store.client_id(ip)
    store.create(client, "alpha", "beta", "Hi?")
    store.close()
    assert ip not in client and client != ArenaStore(tmp_path / "b.sqlite3").client_id(ip)  # salted per database
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.sqlite3*"))
    assert ip.encode() not in raw and client.encode() in raw
    rows = sqlite3.connect(tmp_path / "a.sqlite3").execute("SELECT client FROM battles").fetchall()
    assert rows == [(client,)]


def test_the_rate_limit_is_a_sliding_window_per_client():
    clock = Clock(0.0)
    limiter = RateLimiter(3, window=60.0, clock=clock, max_clients=2)
    assert [limiter.allow("me") for _ in range(3)] == [None, None, None]
    assert limiter.allow("me") == 60.0
    assert limiter.allow("you") is None  # another client has its own budget
    clock.t = 30.0
    assert limiter.allow("me") == 30.0
    clock.t = 60.0  # the first three requests left the window
    assert [limiter.allow("me") for _ in range(4)] == [None, None, None, 60.0]
    assert set(limiter.seen) == {"me"}  # at max_clients, "you" (idle for a whole window) was forgotten
    clock.t = 200.0
    assert limiter.allow("third") is None and limiter.allow("fourth") is None
    assert set(limiter.seen) == {"third", "fourth"}  # memory stays bounded by the active clients


def _store_with_votes(path: Path) -> tuple[ArenaStore, list[str]]:
    clock = Clock()
    store = ArenaStore(path, clock)
    alice, bob = store.client_id("198.51.100.1"), store.client_id("198.51.100.2")
    ids = []
    for who, (a, b), vote in [(bob, ("alpha", "beta"), "a"), (alice, ("beta", "gamma"), "tie"), (bob, ("gamma", "alpha"), "bothbad"),
                              (alice, ("alpha", "gamma"), None)]:
        clock.t += 1
        battle = store.create(who, a, b, f"prompt {len(ids)}")
        store.finish(battle, f"{a} says <b>hi</b>", f"{b} says hi")
        if vote:
            store.vote(battle, who, vote)
        ids.append(battle)
    return store, ids


def test_export_writes_fastchat_battles(tmp_path):
    store, ids = _store_with_votes(tmp_path / "arena.sqlite3")
    store.close()
    out = tmp_path / "battles.jsonl"
    res = CliRunner().invoke(app, ["judge", "arena", "export", "--db", str(tmp_path / "arena.sqlite3"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in rows] == [FASTCHAT_FIELDS] * 3  # the unvoted battle is not a battle yet
    assert [(r["question_id"], r["model_a"], r["model_b"], r["winner"], r["judge"]) for r in rows] == [
        (ids[0], "alpha", "beta", "model_a", "arena_user_0"),
        (ids[1], "beta", "gamma", "tie", "arena_user_1"),
        (ids[2], "gamma", "alpha", "tie (bothbad)", "arena_user_0"),
    ]
    assert rows[0]["conversation_a"] == [{"role": "user", "content": "prompt 0"}, {"role": "assistant", "content": "alpha says <b>hi</b>"}]
    assert all(r["turn"] == 1 and r["anony"] is True and r["tstamp"] > 1000 for r in rows)
    stdout = CliRunner().invoke(app, ["judge", "arena", "export", "--db", str(tmp_path / "arena.sqlite3")])
    assert stdout.exit_code == 0 and stdout.stdout == out.read_text()
    missing = CliRunner().invoke(app, ["judge", "arena", "export", "--db", str(tmp_path / "none.sqlite3")])
    assert missing.exit_code == 1 and "no arena database" in missing.exception.message
    assert not (tmp_path / "none.sqlite3").exists()


def _battle(qid: str, a: str, b: str, winner: str, answer_a: str = "x", answer_b: str = "y", prompt: str = "Q?") -> dict:
    conv = lambda answer: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]  # noqa: E731
    return {"question_id": qid, "model_a": a, "model_b": b, "winner": winner, "judge": "arena_user_0",
            "conversation_a": conv(answer_a), "conversation_b": conv(answer_b), "turn": 1, "anony": True, "language": "unknown", "tstamp": 1.0}


def _write(path: Path, battles: list[dict]) -> Path:
    path.write_text("".join(json.dumps(b) + "\n" for b in battles))
    return path


def test_show_battles_rates_votes_with_the_judges_bradley_terry(tmp_path):
    battles = [_battle("1", "alpha", "beta", "model_a"), _battle("2", "beta", "alpha", "model_a"), _battle("3", "alpha", "gamma", "model_a"),
               _battle("4", "gamma", "beta", "tie (bothbad)"), _battle("5", "beta", "gamma", "model_b"), _battle("6", "alpha", "beta", "tie")]
    path = _write(tmp_path / "battles.jsonl", battles)
    res = CliRunner().invoke(app, ["judge", "show", "--battles", str(path), "--bootstrap", "20", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    games = [("alpha", "beta", 1.0), ("beta", "alpha", 1.0), ("alpha", "gamma", 1.0), ("gamma", "beta", 0.5), ("beta", "gamma", 0.0), ("alpha", "beta", 0.5)]
    assert shown["pairwise"]["bradley_terry"] == results.bradley_terry(games, rounds=20)
    assert shown["arena"]["votes"] == {"model_a": 3, "model_b": 1, "tie": 1, "tie (bothbad)": 1}
    per_model = {m["model"]: (m["win"], m["loss"], m["tie"]) for m in shown["pairwise"]["models"]}
    assert per_model == {"alpha": (2, 1, 1), "beta": (1, 2, 2), "gamma": (1, 1, 1)}
    as_array = tmp_path / "clean_battle_20230905.json"  # FastChat's clean_battle_data.py writes one JSON list
    as_array.write_text(json.dumps(battles, indent=2))
    assert arena.summarize_battles(as_array, rounds=20)["pairwise"]["bradley_terry"] == shown["pairwise"]["bradley_terry"]
    table = CliRunner().invoke(app, ["judge", "show", "--battles", str(path), "--bootstrap", "20"])
    assert table.exit_code == 0 and "Bradley-Terry ratings" in table.stdout and "6 battles from 1 voters" in table.stdout


def test_agreement_counts_ties_as_a_class_and_without_them():
    battles = [_battle("1", "a", "b", "model_a"), _battle("2", "a", "b", "model_b"), _battle("3", "b", "a", "tie"),
               _battle("4", "b", "a", "model_a"), _battle("5", "a", "b", "model_a")]
    judged = [  # the judge's records name the pair in its own order
        {"question_id": "1", "model_1": "b", "model_2": "a", "g1_winner": "model_2", "g2_winner": "model_2"},  # a: agrees
        {"question_id": "2", "model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_1"},  # a: disagrees
        {"question_id": "3", "model_1": "a", "model_2": "b", "g1_winner": "tie", "g2_winner": "tie"},  # tie: agrees
        {"question_id": "4", "model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_2"},  # inconsistent = tie
        {"question_id": "5", "model_1": "a", "model_2": "b", "g1_winner": "error", "g2_winner": "model_1"},  # unreadable
        {"question_id": "9", "model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_1"},  # not a battle
    ]
    got = arena.agreement(battles, judged)
    assert (got["battles"], got["unjudged"], got["judge_errors"]) == (4, 1, 1)
    assert got["agreement"] == 2 / 4
    assert got["without_ties"] == {"battles": 2, "agreement": 1 / 2}
    assert (got["human_ties"], got["judge_ties"]) == (1, 2)


def test_judge_battles_rejudges_them_and_reports_agreement(double, tmp_path):  # noqa: F811
    # the double prefers the answer that says "correct"; the humans agreed twice, disagreed once, tied once
    battles = [_battle("b1", "alpha", "beta", "model_a", "correct", "wrong"), _battle("b2", "beta", "alpha", "model_b", "wrong", "correct"),
               _battle("b3", "alpha", "gamma", "model_b", "correct", "wrong"), _battle("b4", "gamma", "beta", "tie", "correct", "wrong")]
    path = _write(tmp_path / "battles.jsonl", battles)
    out = tmp_path / "judged"
    args = ["judge", "--battles", str(path), "-o", str(out), "--judge-model", "judge-x", "--judge-api-base", double.base]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    assert double.calls == 8  # both orders of every battle
    rows = [json.loads(line) for line in (out / "judge-x_pair.jsonl").read_text().splitlines()]
    assert sorted((r["question_id"], r["model_1"], r["model_2"], r["g1_winner"], r["g2_winner"]) for r in rows) == [
        ("b1", "alpha", "beta", "model_1", "model_1"), ("b2", "beta", "alpha", "model_2", "model_2"),
        ("b3", "alpha", "gamma", "model_1", "model_1"), ("b4", "gamma", "beta", "model_1", "model_1")]
    agree = json.loads(res.stdout)["arena"]["agreement"]
    assert (agree["battles"], agree["agreement"], agree["without_ties"], agree["judge"]) == (4, 2 / 4, {"battles": 3, "agreement": 2 / 3}, "judge-x")
    shown = CliRunner().invoke(app, ["judge", "show", str(out), "--battles", str(path), "--json"])
    assert json.loads(shown.stdout)["arena"]["agreement"] == agree
    again = CliRunner().invoke(app, args)  # cached: no new calls
    assert again.exit_code == 0 and double.calls == 8 and "Agreement of judge judge-x" in again.stdout


def test_bad_battle_files_are_clear_errors(tmp_path):
    runner = CliRunner()
    bad = _write(tmp_path / "bad.jsonl", [{**_battle("1", "a", "b", "model_a"), "winner": "left"}])
    res = runner.invoke(app, ["judge", "show", "--battles", str(bad)])
    assert res.exit_code == 1 and "unknown winner 'left'" in res.exception.message
    twice = _write(tmp_path / "twice.jsonl", [_battle("1", "a", "b", "model_a"), _battle("1", "a", "b", "tie")])
    assert "battle ids repeated: 1" in runner.invoke(app, ["judge", "show", "--battles", str(twice)]).exception.message
    bare = _write(tmp_path / "bare.jsonl", [{**_battle("1", "a", "b", "model_a"), "conversation_a": None}])
    res = runner.invoke(app, ["judge", "--battles", str(bare), "--judge-api-base", "http://127.0.0.1:9/v1", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "battle 1 has no conversations to judge" in res.exception.message
    res = runner.invoke(app, ["judge", "--battles", str(bare), "--pair", "a", "b"])
    assert res.exit_code == 1 and "--battles" in str(res.exception) and "--pair" in str(res.exception)
    good = _write(tmp_path / "good.jsonl", [_battle("1", "a", "b", "model_a")])
    res = runner.invoke(app, ["judge", "show", "--battles", str(good), "--bench", "vicuna80"])
    assert res.exit_code == 1 and "--battles does not go with --bench" in res.exception.message
    with pytest.raises(VicunaError, match="holds no battles"):
        arena.load_battles(_write(tmp_path / "empty.jsonl", []))


def test_judged_battles_go_apart_from_the_benchs_judgments():
    from vicuna_cli.judge import ARENA_JUDGMENTS, JUDGMENTS
    from vicuna_cli.judge.config import JudgeConfig

    assert JudgeConfig(battles=Path("b.jsonl")).output == ARENA_JUDGMENTS != JUDGMENTS == JudgeConfig().output
    assert JudgeConfig(battles=Path("b.jsonl"), output=Path("mine")).output == Path("mine")
    assert JudgeConfig(battles=Path("b.jsonl")).run_mode == "pair"


def test_arena_flags_mirror_the_config_and_reach_the_api_process():
    import inspect

    from vicuna_cli.commands import serve as serve_cmd
    from vicuna_cli.serve.config import ApiConfig, ServeConfig
    from vicuna_cli.serve.launcher import plan

    names = ("arena", "arena_db", "arena_rate_limit", "arena_max_tokens", "arena_temperature")
    for command in (serve_cmd.serve, serve_cmd.api):
        params = inspect.signature(command).parameters
        assert {n: params[n].default.default for n in names} == {n: ApiConfig.model_fields[n].default for n in names}
    api_args = plan(ServeConfig(model=["a", "b"], arena=True, arena_db=Path("/tmp/x.sqlite3"), arena_rate_limit=7))[-1][1]
    assert api_args[api_args.index("--arena-rate-limit") + 1] == "7" and "--arena" in api_args
    assert api_args[api_args.index("--arena-db") + 1] == "/tmp/x.sqlite3"
    assert "--arena" not in plan(ServeConfig(model=["a", "b"]))[-1][1]
    assert ApiConfig().arena_settings() is None
