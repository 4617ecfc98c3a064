#!/usr/bin/env python
"""Judge throughput: 80 questions judged pairwise in both orders (160 judge calls) against a
local OpenAI-compatible server, at concurrency 1 vs 8, then a repeated run from the cache.

Setup (not timed): `vicuna serve -m MODEL` is started on free loopback ports (or --api-base
points at a running server), and two answer sets for the built-in 80 questions are generated
through it with short answers (--answer-tokens; the first run stores them in --workdir and later
runs reuse them: `vicuna judge answer` is resumable). Model "a" answers greedily, model "b" at
temperature 1.0, so the two sets differ.

Timed: `judging.run` (what `vicuna judge --pair a b` runs) with a fresh cache per round, judge
replies capped at --judge-tokens (the embedded 135M model as judge: figures measure the judge
client + server, not judging quality), rounds interleaved c=1, c=8, c=1, c=8 ... Reported: wall
time, judge calls/s, prompt and completion tokens/s (from the server's `usage`), the speed-up
of c=8 over c=1. Then the c=8 run is repeated on its own cache: calls made (goal 0) and wall
time (goal < 3 s), in-process and as a `vicuna judge` process (start-up included).

    VICUNA_HOME=/tmp/vh python benchmarks/bench_judge.py --rounds 1

The server's own capacity is measured by benchmarks/bench_serve.py; compare calls/s and
tokens/s here with its figures at the same concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, loadavg, machine_info, markdown_table, print_machine, summary, write_results  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    port, cport, wport = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vicuna_cli", "serve", "-m", model, "--port", str(port), "--controller-port", str(cport),
         "--worker-port", str(wport), "--dtype", dtype,
         # a worker starved of CPU by its own batch misses 2-s heartbeats on a loaded 2-core box
         "--heartbeat", "5", "--expiry", "120"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vicuna serve exited: see {log}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise SystemExit("vicuna serve did not come up in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


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


def judge_round(base: str, model: str, answers_dir: Path, out: Path, concurrency: int, judge_tokens: int, first_n: int) -> dict:
    from vicuna_cli.judge import judging
    from vicuna_cli.judge.client import ApiClient, Cache, Sampling
    from vicuna_cli.judge.questions import load_bench

    settings = judging.JudgeSettings("pair", ["a", "b"], sampling=Sampling(0.0, judge_tokens), concurrency=concurrency, parse_retries=0)
    answers = judging.load_model_answers(answers_dir, ["a", "b"])
    games = judging.plan_games(load_bench("vicuna80")[:first_n], answers, settings)
    client = ApiClient(base, None, model, Cache(out / "judge_cache.sqlite"), timeout=600)
    s = judging.run(games, answers, client, settings, out)
    return {
        "concurrency": concurrency, "games": len(games), "wall_s": s.elapsed, "calls": s.calls, "cache_hits": s.cache_hits,
        "retries": s.retries, "errors": s.errors, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "calls_per_s": s.calls / s.elapsed if s.elapsed else 0.0,
        "prompt_tok_per_s": s.prompt_tokens / s.elapsed if s.elapsed else 0.0,
        "completion_tok_per_s": s.completion_tokens / s.elapsed if s.elapsed else 0.0,
        "loadavg_after": loadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Model served and used as answerer and judge.")
    ap.add_argument("--api-base", help="Use this running server instead of starting `vicuna serve`.")
    ap.add_argument("--dtype", default="float32", help="--dtype for vicuna serve (float32 is faster than bf16 on CPUs without native bf16).")
    ap.add_argument("--workdir", default="/tmp/bench_judge", help="Answers (reused between runs) and per-round caches.")
    ap.add_argument("--first-n", type=int, default=80, help="Questions judged (80: the whole set, 160 judge calls).")
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--judge-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs=2, default=[1, 8], metavar=("LOW", "HIGH"))
    ap.add_argument("--rounds", type=int, default=1, help="Interleaved rounds of LOW and HIGH.")
    ap.add_argument("--json", help="Write the results here (default benchmarks/results/judge-*.json).")
    args = ap.parse_args()

    info = machine_info()
    print_machine(info)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        if args.api_base:
            base = args.api_base
        else:
            proc, base = start_server(args.model, args.dtype, workdir / "serve.log")
        print(f"server: {base} ({'given' if args.api_base else f'vicuna serve -m {args.model} --dtype {args.dtype}'})", flush=True)
        answers = make_answers(base, args.model, workdir, args.answer_tokens, args.first_n)
        rows = []
        for r in range(args.rounds):
            for c in args.concurrency if r % 2 == 0 else reversed(args.concurrency):
                out = workdir / f"round{r}-c{c}"
                shutil.rmtree(out, ignore_errors=True)
                row = judge_round(base, args.model, answers, out, c, args.judge_tokens, args.first_n)
                row["round"] = r
                rows.append(row)
                print(f"round {r} c={c}: {row['wall_s']:.1f} s, {row['calls']} calls, {row['calls_per_s']:.2f} calls/s, "
                      f"{row['prompt_tok_per_s']:.0f}+{row['completion_tok_per_s']:.1f} tok/s, {row['errors']} unreadable; load {row['loadavg_after']}", flush=True)
        high = args.concurrency[1]
        last = workdir / f"round{args.rounds - 1}-c{high}"
        cached = judge_round(base, args.model, answers, last, high, args.judge_tokens, args.first_n)
        print(f"cached re-run (in process): {cached['wall_s']:.2f} s, {cached['calls']} calls, {cached['cache_hits']} cache hits", flush=True)
        from vicuna_cli.judge.questions import load_bench

        bench = workdir / f"question-{args.first_n}.jsonl"  # the same questions as the timed rounds
        bench.write_text("".join(json.dumps(q.as_dict()) + "\n" for q in load_bench("vicuna80")[: args.first_n]))
        t0 = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "vicuna_cli", "judge", "--pair", "a", "b", "--answers", str(answers), "-o", str(last),
             "--bench", str(bench),
             "--judge-model", args.model, "--judge-api-base", base, "--max-tokens", str(args.judge_tokens), "--parse-retries", "0",
             "-j", str(high), "--json"],
            capture_output=True, text=True, timeout=600,
        )
        cli_wall = time.perf_counter() - t0
        cli_line = next((line for line in cli.stderr.splitlines() if "judgments written" in line), cli.stderr[-500:])
        print(f"cached re-run (vicuna judge process, start-up included): {cli_wall:.2f} s; {cli_line}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)

    def med(c: int, key: str) -> float:
        return summary([r[key] for r in rows if r["concurrency"] == c])["median"]

    low = args.concurrency[0]
    table = markdown_table(
        ["concurrency", "wall (s)", "judge calls", "calls/s", "prompt tok/s", "completion tok/s", "unreadable"],
        [[c, f"{med(c, 'wall_s'):.1f}", int(med(c, "calls")), f"{med(c, 'calls_per_s'):.2f}", f"{med(c, 'prompt_tok_per_s'):.0f}",
          f"{med(c, 'completion_tok_per_s'):.1f}", int(med(c, "errors"))] for c in args.concurrency],
    )
    print("\n" + table)
    print(f"\nspeed-up c={high} over c={low}: {med(low, 'wall_s') / med(high, 'wall_s'):.2f}x")
    print(f"cached re-run: {cached['calls']} calls, {cached['wall_s']:.2f} s in process, {cli_wall:.2f} s as a process")
    path = write_results("judge", {"machine": info, "args": vars(args), "rounds": rows, "cached": cached, "cached_cli_wall_s": cli_wall}, args.json)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
