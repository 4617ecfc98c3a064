#!/usr/bin/env python
"""Judge throughput: 80 questions judged pairwise in both orders (160 judge calls) against a
local OpenAI-compatible server, at concurrency 1 vs 8, each next to the server's own capacity on
the same work, then a repeated run from the cache.

Setup (not timed): `vicuna serve -m MODEL` is started on free loopback ports (or --api-base
points at a running server), and two answer sets for the first --first-n built-in questions are
generated through it with short answers (--answer-tokens; the first run stores them in --workdir
and later runs reuse them: `vicuna judge answer` is resumable). Model "a" answers greedily, model
"b" at temperature 1.0, so the two sets differ.

Timed, per round and concurrency C (rounds interleaved: c=1 then c=8, then c=8 then c=1, ...):
  judge  `judging.run` (what `vicuna judge --pair a b` runs) with a fresh cache, judge replies
         capped at --max-tokens (the embedded 135M model as judge: figures measure the judge
         client + server, not judging quality). Every request that got a reply is recorded.
  raw    exactly those requests (same messages, max_tokens, temperature, response_format if the
         server took it) sent straight to the server by bench_serve.py's load client
         (`run_requests`: streaming, a semaphore of C) -- the server's own capacity on this work.
         Even rounds run judge then raw, odd rounds raw (the previous round's requests) then judge.
Reported per C: wall time of each, judge / raw (goal <= 1.2: the judge loses at most 20 % to its
client, threads, cache and parsing), calls/s and tokens/s, and the speed-up of c=8 over c=1.
Then the last c=8 run is repeated on its own cache: calls made (goal 0) and wall time (goal < 3 s),
in process and as a `vicuna judge` process (start-up included; median of --cli-runs).
Both phases send the same prompts, so a server's prefix cache could serve the second phase
prompts the first one left behind: with the default 256 MiB (~5,800 tokens of the embedded model)
that is only possible when all prompts fit, i.e. small --first-n (a 3-question run's 6 prompts
are ~2,000 tokens); there, pass --serve-arg=--prefix-cache-mb=0. The full set (160 prompts of
~340 tokens) cycles through it, and both phases reuse only the judge's shared instructions.
--time-limit bounds the timed rounds: when it is reached, the running phase stops (a judge run
via its call budget, a raw replay via its level bound), is marked incomplete and left out of the
ratios, and no further phase starts.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_judge.py --rounds 1
    VICUNA_HOME=/tmp/vh python benchmarks/bench_judge.py --first-n 3 --rounds 2 --cli-runs 1 --serve-arg=--prefix-cache-mb=0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import DEFAULT_MODEL, loadavg, machine_info, markdown_table, print_machine, summary, write_results  # noqa: E402
from bench_serve import metrics, run_requests  # noqa: E402
from serve_cluster import Proc  # noqa: E402
from serve_single import start_single  # noqa: E402

GOAL_RATIO = 1.2  # judge wall time / raw replay wall time
GOAL_CACHED_S = 3.0


def start_server(model: str, dtype: str, log: Path, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
    """`vicuna serve -m MODEL` through the tests' one starter (tests/serve_single.py), its log in
    log.parent/serve.log; returns the process and its API base."""
    # a worker starved of CPU by its own batch misses 2-s heartbeats on a loaded 2-core box
    proc = start_single(log.parent, model, "--heartbeat", "5", "--expiry", "120", *extra, env=dict(os.environ),
                        worker_args=("--dtype", dtype), timeout=600)
    return proc, f"{proc.url}/v1"


def stop_server(proc: Proc) -> None:
    proc.stop(timeout=30)


def make_answers(base: str, model: str, workdir: Path, tokens: int, first_n: int) -> Path:
    from vicuna_cli.judge.answers import AnswerSettings, ApiAnswerer, generate_answers
    from vicuna_cli.judge.questions import load_bench

    answers = workdir / "model_answer"
    qs = load_bench("vicuna80")[:first_n]
    for name, temperature in (("a", 0.0), ("b", 1.0)):
        t0 = time.perf_counter()
        _, done, skipped = generate_answers(qs, ApiAnswerer(base, None, model), answers, AnswerSettings(tokens, temperature, 8), model_id=name)
        print(f"answers {name}: {done} generated, {skipped} reused ({time.perf_counter() - t0:.0f} s)", flush=True)
    return answers


def recording_client(base: str, model: str, cache_path: Path) -> Any:
    """The judge's ApiClient, keeping every request that got a reply (for the raw replay)."""
    from vicuna_cli.judge.client import ApiClient, Cache

    class Recording(ApiClient):
        def _call(self, messages: list[dict], settings: dict) -> Any:
            reply = super()._call(messages, settings)
            with self._lock:
                self.sent.append({"messages": messages, **settings})
            return reply

    client = Recording(base, None, model, Cache(cache_path), timeout=600)
    client.sent = []
    return client


def judge_round(base: str, model: str, answers_dir: Path, out: Path, concurrency: int, judge_tokens: int, first_n: int,
                deadline: float) -> tuple[dict, list[dict]]:
    from vicuna_cli.judge import judging
    from vicuna_cli.judge.client import Sampling
    from vicuna_cli.judge.questions import load_bench

    settings = judging.JudgeSettings("pair", ["a", "b"], sampling=Sampling(0.0, judge_tokens), concurrency=concurrency, parse_retries=0)
    answers = judging.load_model_answers(answers_dir, ["a", "b"])
    games = judging.plan_games(load_bench("vicuna80")[:first_n], answers, settings)
    client = recording_client(base, model, out / "judge_cache.sqlite")

    def out_of_time() -> None:  # no new call starts; the calls in flight finish (BudgetReached)
        client.max_calls = 0

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), out_of_time)
    timer.daemon = True
    timer.start()
    try:
        s = judging.run(games, answers, client, settings, out)
    finally:
        timer.cancel()
    row = {
        "phase": "judge", "concurrency": concurrency, "games": len(games), "wall_s": s.elapsed, "calls": s.calls,
        "cache_hits": s.cache_hits, "retries": s.retries, "errors": s.errors, "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens, "complete": s.stopped is None and s.calls + s.cache_hits == len(games),
        "schema_sent": sum("response_format" in r for r in client.sent), "loadavg_after": loadavg(),
    }
    return row, client.sent


def raw_round(base: str, model: str, requests: list[dict], concurrency: int, request_timeout: float, deadline: float) -> dict:
    """The judge's requests straight at the server, through bench_serve.py's load client."""
    bodies = [{"model": model, **r, "stream": True, "stream_options": {"include_usage": True}} for r in requests]
    bound = max(1.0, deadline - time.monotonic())
    results, duration = asyncio.run(run_requests(f"{base.rstrip('/')}/chat/completions", bodies, concurrency, request_timeout, bound))
    m = metrics(results, duration)
    return {
        "phase": "raw", "concurrency": concurrency, "games": len(bodies), "wall_s": duration, "calls": m["completed"],
        "failed": m["failed"], "failures": m["errors"], "prompt_tokens": m["total_input_tokens"],
        "completion_tokens": m["total_output_tokens"], "complete": m["failed"] == 0, "loadavg_after": loadavg(),
    }


def warm_up(base: str, model: str, request_timeout: float) -> None:
    """Costs the first timed run should not pay: importing `openai` (the judge client imports it
    at its first call, ~1 s) and the server's first request."""
    import openai  # noqa: F401

    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "stream": True}
    results, _ = asyncio.run(run_requests(f"{base.rstrip('/')}/chat/completions", [body], 1, request_timeout, request_timeout))
    if not results[0].ok:
        raise SystemExit(f"the warm-up request failed: {results[0].error}")


def rate(row: dict, key: str) -> float:
    return row[key] / row["wall_s"] if row["wall_s"] else 0.0


def cached_cli_runs(base: str, model: str, answers: Path, out: Path, judge_tokens: int, concurrency: int, runs: int) -> tuple[list[float], str]:
    """`vicuna judge` as a process on a warm cache (start-up included): wall times and the summary line.
    The answers were made for the built-in vicuna80 (their first --first-n questions), so the run
    names that bench (answer files record theirs, and judge refuses a mismatch) and judges the
    questions both models answered (--allow-missing): the same games as the timed rounds."""
    walls, line = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "vicuna_cli", "judge", "--pair", "a", "b", "--answers", str(answers), "-o", str(out),
             "--bench", "vicuna80", "--allow-missing", "--judge-model", model, "--judge-api-base", base, "--max-tokens", str(judge_tokens),
             "--parse-retries", "0", "-j", str(concurrency), "--json"],
            capture_output=True, text=True, timeout=600,
        )
        walls.append(time.perf_counter() - t0)
        line = next((x for x in cli.stderr.splitlines() if "judgments written" in x), "")
        # With replies capped at a few tokens (the default 16) no verdict is readable, and
        # `vicuna judge` then exits 1 after writing them all; what is timed here is the cached run.
        all_unreadable = cli.returncode == 1 and line and "no readable verdict" in cli.stderr
        if cli.returncode != 0 and not all_unreadable:
            raise SystemExit(f"the cached `vicuna judge` run failed: {cli.stderr[-500:]}")
    return walls, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Model served and used as answerer and judge.")
    ap.add_argument("--api-base", help="Use this running server instead of starting `vicuna serve`.")
    ap.add_argument("--dtype", default="float32", help="--dtype for vicuna serve (float32 is faster than bf16 on CPUs without native bf16).")
    ap.add_argument("--serve-arg", action="append", default=[], help="Extra flag for `vicuna serve` (repeatable), e.g. --serve-arg=--prefix-cache-mb=0.")
    ap.add_argument("--workdir", default="/tmp/bench_judge", help="Answers (reused between runs) and per-round caches.")
    ap.add_argument("--first-n", type=int, default=80, help="Questions judged (80: the whole set, 160 judge calls).")
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", "--judge-tokens", dest="judge_tokens", type=int, default=16, help="Longest judge reply (the judge's --max-tokens).")
    ap.add_argument("--concurrency", type=int, nargs=2, default=[1, 8], metavar=("LOW", "HIGH"))
    ap.add_argument("--rounds", type=int, default=1, help="Interleaved rounds of LOW and HIGH.")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="Bound (s) on the timed rounds (setup and the cached runs excluded).")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="Bound (s) on one raw request.")
    ap.add_argument("--cli-runs", type=int, default=5, help="Cached `vicuna judge` process runs (median reported).")
    ap.add_argument("--json", help="Write the results here (default benchmarks/records/judge-*.json).")
    args = ap.parse_args()

    info = machine_info()
    print_machine(info)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = None
    rows: list[dict] = []
    try:
        if args.api_base:
            base = args.api_base
        else:
            proc, base = start_server(args.model, args.dtype, workdir / "serve.log", tuple(args.serve_arg))
        print(f"server: {base} ({'given' if args.api_base else f'vicuna serve -m {args.model} --dtype {args.dtype} ' + ' '.join(args.serve_arg)})", flush=True)
        answers = make_answers(base, args.model, workdir, args.answer_tokens, args.first_n)
        warm_up(base, args.model, args.request_timeout)
        deadline = time.monotonic() + args.time_limit
        recorded: dict[int, list[dict]] = {}
        for r in range(args.rounds):
            for c in args.concurrency if r % 2 == 0 else reversed(args.concurrency):
                phases = ["judge", "raw"] if r % 2 == 0 or c not in recorded else ["raw", "judge"]
                for phase in phases:
                    if time.monotonic() >= deadline:
                        print(f"time limit ({args.time_limit:.0f} s) reached: round {r} c={c} {phase} not run", flush=True)
                        continue
                    if phase == "judge":
                        out = workdir / f"round{r}-c{c}"
                        shutil.rmtree(out, ignore_errors=True)
                        row, recorded[c] = judge_round(base, args.model, answers, out, c, args.judge_tokens, args.first_n, deadline)
                    else:
                        row = raw_round(base, args.model, recorded[c], c, args.request_timeout, deadline)
                    row["round"] = r
                    rows.append(row)
                    print(f"round {r} c={c} {phase}: {row['wall_s']:.1f} s, {row['calls']} calls, {rate(row, 'calls'):.2f} calls/s, "
                          f"{rate(row, 'prompt_tokens'):.0f}+{rate(row, 'completion_tokens'):.1f} tok/s"
                          f"{'' if row['complete'] else ' (INCOMPLETE: left out of the ratios)'}; load {row['loadavg_after']}", flush=True)
        high = args.concurrency[1]
        last = next((workdir / f"round{row['round']}-c{high}" for row in reversed(rows) if row["phase"] == "judge" and row["concurrency"] == high and row["complete"]), None)
        cached, cli_walls, cli_line = None, [], ""
        if last is None:
            print("no complete judge run at the high concurrency: the cached re-run is skipped", flush=True)
        else:
            cached, _ = judge_round(base, args.model, answers, last, high, args.judge_tokens, args.first_n, time.monotonic() + 600)
            print(f"cached re-run (in process): {cached['wall_s']:.2f} s, {cached['calls']} calls, {cached['cache_hits']} cache hits", flush=True)
            cli_walls, cli_line = cached_cli_runs(base, args.model, answers, last, args.judge_tokens, high, args.cli_runs)
            print(f"cached re-run (vicuna judge process, start-up included): {', '.join(f'{w:.2f}' for w in cli_walls)} s; {cli_line}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)

    def done(c: int, phase: str) -> list[dict]:
        return [row for row in rows if row["concurrency"] == c and row["phase"] == phase and row["complete"]]

    def med(c: int, phase: str, key: str) -> float:
        values = [row[key] for row in done(c, phase)]
        return summary(values)["median"] if values else float("nan")

    def med_rate(c: int, phase: str, key: str) -> float:
        values = [rate(row, key) for row in done(c, phase)]
        return summary(values)["median"] if values else float("nan")

    table, ratios = [], {}
    for c in args.concurrency:
        for phase in ("judge", "raw"):
            n = len(done(c, phase))
            table.append([c, phase, n, f"{med(c, phase, 'wall_s'):.1f}", f"{med(c, phase, 'calls'):.0f}", f"{med_rate(c, phase, 'calls'):.3f}",
                          f"{med_rate(c, phase, 'prompt_tokens'):.0f}", f"{med_rate(c, phase, 'completion_tokens'):.1f}",
                          f"{med(c, phase, 'completion_tokens'):.0f}"])
        per_round = [j["wall_s"] / w["wall_s"] for j in done(c, "judge") for w in done(c, "raw") if j["round"] == w["round"]]
        ratios[c] = {"median_walls": med(c, "judge", "wall_s") / med(c, "raw", "wall_s") if done(c, "raw") and done(c, "judge") else float("nan"),
                     "per_round": per_round}
    print("\n" + markdown_table(["concurrency", "phase", "rounds", "wall (s)", "calls", "calls/s", "prompt tok/s", "completion tok/s", "completion tokens"], table))
    print("\n" + markdown_table(
        ["concurrency", "judge / raw wall time", "per round", f"goal ≤ {GOAL_RATIO}"],
        [[c, f"{v['median_walls']:.2f}", ", ".join(f"{x:.2f}" for x in v["per_round"]) or "-",
          "n/a" if v["median_walls"] != v["median_walls"] else ("pass" if v["median_walls"] <= GOAL_RATIO else "FAIL")] for c, v in ratios.items()],
    ))
    low = args.concurrency[0]
    print(f"\nspeed-up c={high} over c={low} (judge): {med(low, 'judge', 'wall_s') / med(high, 'judge', 'wall_s'):.2f}x; "
          f"(raw): {med(low, 'raw', 'wall_s') / med(high, 'raw', 'wall_s'):.2f}x")
    if cached is not None:
        cli_med = statistics.median(cli_walls)
        print(f"cached re-run: {cached['calls']} calls, {cached['wall_s']:.2f} s in process; as a process: median {cli_med:.2f} s of "
              f"{len(cli_walls)} (min {min(cli_walls):.2f}, max {max(cli_walls):.2f}); goal 0 calls and < {GOAL_CACHED_S:.0f} s: "
              f"{'pass' if cached['calls'] == 0 and cli_med < GOAL_CACHED_S else 'FAIL'}")
    path = write_results("judge", {"machine": info, "args": vars(args), "rounds": rows, "ratios": {str(c): v for c, v in ratios.items()},
                                   "cached": cached, "cached_cli_wall_s": cli_walls, "loadavg_at_end": loadavg()}, args.json)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
