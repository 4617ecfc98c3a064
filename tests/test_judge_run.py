"""Judging runs against a real local HTTP server: a scripted OpenAI-compatible judge double.

The double answers /v1/chat/completions like a judge that reads the answers: an answer that
contains "correct" beats one that does not. It counts every request, so the tests can assert how
many judge calls a run, a resumed run and a repeated run make, and it can be told to answer 429
with Retry-After, 401, 403, refusals, garbage, slow replies or reject `response_format`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from judge_double import QUESTIONS, judge_client, read_rows  # fixtures `double`, `workdir`: conftest.py
from processes import closed_port
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge import judging
from vicuna_cli.judge.client import ApiClient, Sampling

def _run(double, workdir, mode="pair", models=("good", "bad"), **kw):
    settings = judging.JudgeSettings(mode, list(models), kw.pop("baseline", None), Sampling(), kw.pop("concurrency", 4), kw.pop("allow_missing", False),
                                     explanation_chars=kw.pop("explanation_chars", None))
    answers = judging.load_model_answers(workdir / "answers", list(models))
    games = judging.plan_games(QUESTIONS, answers, settings)
    client = judge_client(double, workdir / "out", **kw)
    return judging.run(games, answers, client, settings, workdir / "out"), client


FASTCHAT_PAIR_FIELDS = {
    "question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment",
    "g2_user_prompt", "g2_judgment", "turn", "tstamp",
}


def test_pairwise_both_orders_fastchat_records(double, workdir):
    summary, client = _run(double, workdir)
    # 5 questions, one with two turns: 6 matches, each judged in both orders
    assert double.calls == 12 and summary.calls == 12 and summary.records == 6 and summary.errors == 0
    assert all(r["response_format"]["type"] == "json_schema" for r in double.requests)
    assert all(r["temperature"] == 0.0 for r in double.requests)
    rows = read_rows(summary.path)
    assert summary.path.name == "judge-x_pair.jsonl"
    assert all(set(r) == FASTCHAT_PAIR_FIELDS | {"category"} | ({"reference_source"} if r["category"] in ("math", "coding") else set()) for r in rows)
    assert {(r["question_id"], r["turn"], r["g1_winner"], r["g2_winner"]) for r in rows} == {
        (1, 1, "model_1", "model_1"), (2, 1, "model_1", "model_1"), (3, 1, "model_1", "model_1"),
        (4, 1, "model_1", "model_1"), (5, 1, "model_1", "model_1"), (5, 2, "model_1", "model_1"),
    }
    by_q = {(r["question_id"], r["turn"]): r for r in rows}
    assert by_q[(3, 1)]["judge"] == ["judge-x", "vicuna-pair-ref-v1"]  # math: reference-guided
    assert "[Start of Reference Answer]\n4\n" in by_q[(3, 1)]["g1_user_prompt"]
    assert by_q[(5, 2)]["judge"] == ["judge-x", "vicuna-pair-multi-v1"]
    assert "Now make it sadder." in by_q[(5, 2)]["g1_user_prompt"]
    # game 2 shows model_2 as A: the "good" answer is second in g1 and first in g2
    assert by_q[(1, 1)]["g1_user_prompt"].index("correct") < by_q[(1, 1)]["g1_user_prompt"].index("wrong")
    assert by_q[(1, 1)]["g2_user_prompt"].index("correct") > by_q[(1, 1)]["g2_user_prompt"].index("wrong")
    # a repeated run is served from the cache: no call, same verdicts, the file not duplicated
    summary2, _ = _run(double, workdir)
    assert double.calls == 12 and summary2.calls == 0 and summary2.cache_hits == 12
    assert [(r["question_id"], r["g1_winner"]) for r in read_rows(summary2.path)] == [(r["question_id"], r["g1_winner"]) for r in rows]


@pytest.mark.parametrize("mode", ["pair", "single"])
def test_explanation_bound_is_sent_as_the_schemas_max_length(double, workdir, mode):
    summary, _ = _run(double, workdir, mode=mode, explanation_chars=200)
    assert summary.errors == 0 and double.requests
    for request in double.requests:
        properties = request["response_format"]["json_schema"]["schema"]["properties"]
        assert properties["explanation"] == {"type": "string", "maxLength": 200}
    # the shared schema is not changed for the next run
    assert "maxLength" not in judging.SCHEMAS[summary.path.stem.split("_")[-1]]["schema"]["properties"]["explanation"]


def test_position_biased_judge_gives_ties_and_zero_consistency(double, workdir):
    double.mode = "first"  # always prefers whatever is shown first
    summary, _ = _run(double, workdir)
    from vicuna_cli.judge import results

    table = results.pairwise_tables(read_rows(summary.path), {})
    (pair,) = table["pairs"]
    assert (pair["win"], pair["loss"], pair["tie"], pair["inconsistent"]) == (0, 0, 6, 6)
    assert pair["position_consistency"] == 0.0


def test_single_baseline_and_all_modes(double, workdir):
    summary, _ = _run(double, workdir, mode="single", models=("good", "bad"))
    rows = read_rows(summary.path)
    assert summary.path.name == "judge-x_single.jsonl" and double.calls == 12
    assert {(r["model"], r["question_id"], r["turn"]): r["score"] for r in rows if r["question_id"] == 5} == {
        ("good", 5, 1): 9.0, ("good", 5, 2): 9.0, ("bad", 5, 1): 3.0, ("bad", 5, 2): 3.0,
    }
    assert {r["judge"][1] for r in rows} == {"vicuna-single-v1", "vicuna-single-ref-v1", "vicuna-single-multi-v1"}
    double.requests.clear()
    summary, _ = _run(double, workdir, mode="pairwise-baseline", models=("good", "meh", "bad"), baseline="bad", allow_missing=True)
    rows = read_rows(summary.path)
    # good vs bad: 6 matches; meh vs bad: 4 (meh lacks questions 2 and 4)
    assert sorted({(r["model_1"], r["model_2"]) for r in rows}) == [("good", "bad"), ("meh", "bad")]
    assert len(rows) == 10 and double.calls == 20
    double.requests.clear()
    settings = judging.JudgeSettings("pairwise-all", ["good", "bad", "meh"], allow_missing=True)
    answers = judging.load_model_answers(workdir / "answers", settings.models)
    games = judging.plan_games(QUESTIONS, answers, settings)
    assert len(games) == 2 * (6 + 4 + 4)


def test_missing_answers_and_unknown_model(double, workdir):
    with pytest.raises(VicunaError, match=r"answers missing: meh lacks 2 \(2, 4\)") as exc:
        _run(double, workdir, models=("good", "meh"))
    assert "--allow-missing" in exc.value.hint
    summary, _ = _run(double, workdir, models=("good", "meh"), allow_missing=True)
    assert summary.records == 4  # questions 1, 3, 5 (two turns)
    with pytest.raises(VicunaError, match="no answers for model 'gpt-9' in .*; available: bad, good, meh"):
        _run(double, workdir, models=("good", "gpt-9"))


def test_unreadable_verdicts_are_retried_then_counted(double, workdir):
    double.mode = "garbage"
    summary, _ = _run(double, workdir)
    # each game: the first reply and one repair turn
    assert double.calls == 24 and summary.errors == 6
    assert double.requests[-1]["messages"][-1]["content"].startswith("Your reply did not contain a verdict")
    rows = read_rows(summary.path)
    assert all(r["g1_winner"] == "error" and r["g2_winner"] == "error" for r in rows)
    assert all("no readable verdict after 2 replies" in r["error"] for r in rows)
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "show", str(summary.path), "--bootstrap", "5"])
    assert "unreadable verdicts: 6 of 6 records" in res.stdout
    # the command says so, and says what to do when the judge never produced a verdict
    res = runner.invoke(app, ["judge", "--pair", "good", "bad", "--answers", str(workdir / "answers"), "-o", str(workdir / "cli"),
                              "--bench", str(workdir / "question.jsonl"), "--judge-model", "judge-x", "--judge-api-base", double.base])
    # a run with no readable verdict at all is a failure, not a result
    assert res.exit_code == 1 and isinstance(res.exception, VicunaError), res.output
    assert "all 6 judgments have no readable verdict" in res.exception.message and "use a stronger --judge-model" in res.exception.hint
    assert len(read_rows(workdir / "cli" / "judge-x_pair.jsonl")) == 6  # the error records are kept


def test_max_calls_stops_cleanly_and_resume_finishes(double, workdir):
    summary, _ = _run(double, workdir, max_calls=5)
    assert summary.stopped == "--max-calls 5 reached" and double.calls == 5
    summary, _ = _run(double, workdir)
    assert double.calls == 12 and summary.calls == 7 and summary.cache_hits == 5 and summary.records == 6
    _run(double, workdir)
    assert double.calls == 12


def test_429_retry_after_is_honoured(double, workdir):
    double.fail = [(429, {"Retry-After": "1"}, {"error": {"message": "slow down", "type": "rate_limit"}})]
    waits: list[float] = []  # the client's injected sleep: the wait it chose, without spending it
    client = judge_client(double, workdir / "out", sleep=waits.append)
    reply = client.complete([{"role": "system", "content": "s"}, {"role": "user", "content": "Rating please [Start of Assistant's Answer]\ncorrect\n[End of"}], Sampling())
    assert waits == [1.0]  # exactly the server's Retry-After, not the client's own backoff
    assert double.calls == 2 and client.retries == 1 and client.calls == 2
    assert reply.text == "Rating: [[9]]"  # no schema was asked for


def test_5xx_and_timeouts_back_off_then_give_up(double, workdir):
    double.fail = [(503, {"retry-after-ms": "10"}, {"error": {"message": "overloaded"}})] * 2
    client = judge_client(double, workdir / "out", timeout=0.5)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "[Start of Assistant's Answer]\nx\n[End of"}]
    assert client.complete(msgs, Sampling()).text
    assert double.calls == 3
    double.requests.clear()
    double.delay = 1.5  # longer than the client's timeout: every attempt times out
    client = judge_client(double, workdir / "out2", timeout=0.3, max_retries=1, sleep=lambda s: None)
    with pytest.raises(VicunaError, match="kept failing after 1 retries .*APITimeoutError"):
        client.complete(msgs, Sampling())
    assert double.calls == 2


def test_unreachable_endpoint(workdir):
    with closed_port() as port:  # bound, not listening: connections are refused
        client = ApiClient(f"http://127.0.0.1:{port}/v1", "k", "m", max_retries=1, sleep=lambda s: None)
        with pytest.raises(VicunaError, match=r"could not connect to http://127.0.0.1:\d+/v1 \(APIConnectionError") as exc:
            client.complete([{"role": "user", "content": "hi"}], Sampling())
    assert "is the server running" in exc.value.hint and client.calls == 2


def test_401_403_and_refusal_are_clear_errors(double, workdir):
    double.fail = [(401, {}, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})]
    with pytest.raises(VicunaError, match=r"rejected the API key \(401\): Incorrect API key provided") as exc:
        _run(double, workdir)
    assert "OPENAI_API_KEY" in exc.value.hint
    double.fail = [(403, {}, {"error": {"message": "not allowed"}})]
    with pytest.raises(VicunaError, match=r"refused the request \(403\)"):
        _run(double, workdir)
    double.mode = "refuse"
    with pytest.raises(VicunaError, match="refused to answer: I can't help with grading that") as exc:
        _run(double, workdir, concurrency=1)
    assert "--judge-model" in exc.value.hint


def test_endpoint_without_response_format_falls_back_and_remembers(double, workdir):
    double.reject_schema = True
    summary, _ = _run(double, workdir)
    assert summary.records == 6 and summary.errors == 0
    rejected = [r for r in double.requests if "response_format" in r]
    assert 1 <= len(rejected) <= 4  # the calls in flight when the first rejection came back
    assert double.calls == 12 + len(rejected)
    with sqlite3.connect(workdir / "out" / "judge_cache.sqlite") as db:
        assert db.execute("SELECT value FROM capabilities").fetchone() == ("unsupported",)
    double.requests.clear()
    _run(double, workdir)
    assert double.calls == 0  # the capability is remembered, so the cached keys match


def _cli_env(double) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VICUNA_JUDGE"))}
    env.update(VICUNA_JUDGE_API_BASE=double.base, OPENAI_API_KEY="sk-test")
    return env


def _cli(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vicuna_cli", "judge", "--answers", str(workdir / "answers"), "-o", str(workdir / "out"),
            "--bench", str(workdir / "question.jsonl"), "--judge-model", "judge-x", *args]


def test_cli_dry_run_then_interrupted_run_resumes(double, workdir):
    env = _cli_env(double)
    done = subprocess.run(_cli(workdir, "--pair", "good", "bad", "--dry-run", "--price", "2,8", "--est-output-tokens", "100"),
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    m = re.search(r"6 judgments planned, 12 judge calls: 12 needed \(0 in the cache\), ~(\d+) prompt tokens \+ ~1200 output tokens, ~\$([\d.]+)", done.stdout)
    assert m, done.stdout
    assert float(m.group(2)) == pytest.approx(round((int(m.group(1)) * 2 + 1200 * 8) / 1e6, 2))
    assert double.calls == 0
    # a real interruption: Ctrl-C (SIGINT) while calls are in flight
    double.delay = 0.3
    proc = subprocess.Popen(_cli(workdir, "--pair", "good", "bad", "-j", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while double.calls < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    first = double.calls
    with sqlite3.connect(workdir / "out" / "judge_cache.sqlite") as db:
        cached = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert 3 <= cached <= first < 12
    double.delay = 0
    done = subprocess.run(_cli(workdir, "--pair", "good", "bad"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert double.calls - first == 12 - cached  # only what the first run had not finished
    assert "good" in done.stdout and "position consistency: 100.0%" in done.stdout
    again = subprocess.run(_cli(workdir, "--pair", "good", "bad", "--dry-run"), capture_output=True, text=True, env=env, timeout=60)
    assert "12 judge calls: 0 needed (12 in the cache), ~0 prompt tokens" in again.stdout


def test_cli_errors_are_one_line(double, workdir):
    env = _cli_env(double)
    double.fail = [(401, {}, {"error": {"message": "bad key"}})]
    done = subprocess.run(_cli(workdir, "--pair", "good", "bad", "-j", "1"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith("error: the endpoint http://127.0.0.1:") and "(401): bad key" in done.stderr
    done = subprocess.run(_cli(workdir, "--pair", "good", "nobody"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "no answers for model 'nobody'" in done.stderr and "available: bad, good, meh" in done.stderr
    done = subprocess.run(_cli(workdir, "--mode", "sideways"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "error: --mode: unknown 'sideways'; known: pair, pairwise-all, pairwise-baseline, pairwise-scores, single\n" == done.stderr
    done = subprocess.run(_cli(workdir, "--pair", "good", "meh"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "answers missing: meh lacks 2 (2, 4)" in done.stderr
    done = subprocess.run(_cli(workdir, "--pair", "good", "bad", "--max-calls", "3"), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "stopped: --max-calls 3 reached" in done.stderr


def test_cli_run_from_the_cache_makes_no_call_and_does_not_import_openai(double, workdir):
    _run(double, workdir)
    assert double.calls == 12
    # the `vicuna judge` process, with a probe that reports at exit (after the results are printed)
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('openai imported:', 'openai' in sys.modules, 'torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
        f"sys.argv = ['vicuna'] + {_cli(workdir, '--pair', 'good', 'bad')[3:]!r}\n"
        "from vicuna_cli.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_cli_env(double), timeout=60)
    assert done.returncode == 0, done.stderr
    assert double.calls == 12  # not one more
    assert "6 judgments written" in done.stderr and "0 judge calls, 12 from cache" in done.stderr
    assert "openai imported: False torch imported: False" in done.stderr
    assert "position consistency: 100.0%" in done.stdout


def test_reference_source_in_dry_run_records_and_show(double, workdir):
    bench = workdir / "bench"
    (bench / "reference_answer").mkdir(parents=True)
    (bench / "question.jsonl").write_text((workdir / "question.jsonl").read_text())
    # the reference model answered question 3 (math) only; 4 (coding) keeps its inline reference
    (bench / "reference_answer" / "gpt-4.jsonl").write_text(json.dumps(
        {"question_id": 3, "answer_id": "r3", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["2+2 = 4, worked"]}]}) + "\n")
    args = ["judge", "--pair", "good", "bad", "--answers", str(workdir / "answers"), "-o", str(workdir / "refs"),
            "--bench", str(bench), "--judge-model", "judge-x", "--judge-api-base", double.base]
    runner = CliRunner()
    res = runner.invoke(app, args + ["--dry-run"])
    assert res.exit_code == 0, res.output
    assert "reference answers: 2 calls from inline, 2 calls from reference_answer/gpt-4.jsonl" in res.stdout
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = {r["question_id"]: r for r in read_rows(workdir / "refs" / "judge-x_pair.jsonl")}
    assert rows[3]["reference_source"] == "reference_answer/gpt-4.jsonl" and "2+2 = 4, worked" in rows[3]["g1_user_prompt"]
    assert rows[4]["reference_source"] == "inline" and "xs[::-1]" in rows[4]["g1_user_prompt"]
    assert "reference_source" not in rows[1]
    res = runner.invoke(app, ["judge", "show", str(workdir / "refs"), "--bootstrap", "0"])
    assert "reference answers: 1 judgments used inline, 1 judgments used reference_answer/gpt-4.jsonl" in res.stdout
