"""Two judge runs writing the same judgment file at once (issue #18, item 11): each said
"6 judgments written" and the file held 11 rows, because one run's closing rewrite replaced the
file while the other was still appending to it. Now the second run waits for the first (and says
for whom), and every judgment of both runs is in the file."""

from __future__ import annotations

import os
import threading

from judge_double import QUESTIONS, judge_client, read_rows  # fixtures `double`, `workdir`: conftest.py

from vicuna_cli.judge import judging
from vicuna_cli.judge.client import Sampling

WAIT = 60  # seconds; only reached if the code under test is broken


def _judge(double, workdir, model: str, results: dict) -> None:
    settings = judging.JudgeSettings("single", [model], None, Sampling(), 2)
    answers = judging.load_model_answers(workdir / "answers", [model])
    games = judging.plan_games(QUESTIONS, answers, settings)
    results[model] = judging.run(games, answers, judge_client(double, workdir / "out"), settings, workdir / "out")


def test_two_concurrent_runs_keep_every_judgment(double, workdir, monkeypatch):
    first_started, second_waits_or_ends = threading.Event(), threading.Event()
    messages: list[str] = []

    def hold(body: dict) -> None:
        # The first run ("good" answers say "correct") stalls mid-run until the second run has
        # either finished (the old race) or is waiting for the first (the fix).
        if "correct answer" in body["messages"][1]["content"]:
            first_started.set()
            second_waits_or_ends.wait(WAIT)

    def waiting(message: str) -> None:
        messages.append(message)
        second_waits_or_ends.set()

    double.hold = hold
    monkeypatch.setattr(judging, "warn", waiting)
    results: dict = {}
    first = threading.Thread(target=_judge, args=(double, workdir, "good", results))
    first.start()
    assert first_started.wait(WAIT)
    second = threading.Thread(target=_judge, args=(double, workdir, "bad", results))
    second.start()
    second.join(2 * WAIT)
    second_waits_or_ends.set()
    first.join(2 * WAIT)
    second.join(2 * WAIT)
    assert not first.is_alive() and not second.is_alive()
    assert results["good"].records == results["bad"].records == 6
    rows = read_rows(results["good"].path)
    assert sorted((r["model"], r["question_id"], r["turn"]) for r in rows) == sorted(
        (m, q.question_id, t + 1) for m in ("good", "bad") for q in QUESTIONS for t in range(len(q.turns)))
    assert messages == [f"another run (pid {os.getpid()}) is writing {results['good'].path}; waiting for it to finish"]
