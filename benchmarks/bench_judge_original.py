#!/usr/bin/env python
"""The original 2023 evaluation end to end: `vicuna judge --mode pairwise-scores` on the built-in
80 questions, with the embedded model as both answerer and judge, through `vicuna serve`
(the judge's replies schema-constrained by the server's JSON-schema `response_format`).

Setup (not timed; bench_judge.py's helpers): the server is started on free loopback ports and two
answer sets are generated through it (--answer-tokens; "a" greedy, "b" at temperature 1.0), reused
from --workdir when they are there. Timed: one `vicuna judge --mode pairwise-scores --pair a b`
process (start-up included) with a fresh output directory and cache. Reported: wall time, judge
calls, calls/s, readable reviews, and the run's own figures ("b reaches N % of a", win/tie/loss).
The JSON record goes to --json (default benchmarks/records/judge-original-*.json).

    VICUNA_HOME=/tmp/vh python benchmarks/bench_judge_original.py --workdir /tmp/bench_original
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, loadavg, machine_info, print_machine, write_results  # noqa: E402
from bench_judge import make_answers, start_server, stop_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Model served and used as answerer and judge.")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--first-n", type=int, default=80)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=24, help="Judge reply cap (the schema puts both scores first).")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--swap", action="store_true", help="Judge both orders (twice the calls).")
    ap.add_argument("--workdir", default="/tmp/bench_judge_original")
    ap.add_argument("--json", help="Write the results here (default benchmarks/records/judge-original-*.json).")
    args = ap.parse_args()
    info = machine_info()
    print_machine(info)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    proc, base = start_server(args.model, args.dtype, workdir / "serve.log")
    try:
        answers = make_answers(base, args.model, workdir, args.answer_tokens, args.first_n)
        bench = workdir / "question.jsonl"  # the first --first-n built-in questions, as a file
        from vicuna_cli.judge.questions import load_bench

        bench.write_text("".join(json.dumps(q.as_dict()) + "\n" for q in load_bench("vicuna80")[: args.first_n]))
        out = workdir / "judgment"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "vicuna_cli", "judge", "--mode", "pairwise-scores", "--pair", "a", "b", "--answers", str(answers),
               "-o", str(out), "--bench", str(bench) if args.first_n < 80 else "vicuna80", "--judge-model", args.model,
               "--judge-api-base", base, "--max-tokens", str(args.max_tokens), "-j", str(args.concurrency), "--timeout", "900", "--json"]
        cmd += ["--swap"] if args.swap else []
        load_before = loadavg()
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        wall = time.perf_counter() - t0
        load_after = loadavg()
    finally:
        stop_server(proc)
    print(done.stderr, file=sys.stderr)
    m = re.search(r"(\d+) judgments written to .* (\d+) judge calls", done.stderr)
    if done.returncode not in (0, 1) or not m:
        raise SystemExit(f"vicuna judge failed ({done.returncode}): {done.stderr[-2000:]}")
    records, calls = int(m.group(1)), int(m.group(2))
    result = json.loads(done.stdout) if done.returncode == 0 else {}
    pair = (result.get("scores") or {}).get("pairs", [{}])[0]
    errors = len((result.get("scores") or {}).get("errors", [])) if result else records
    row = {"questions": args.first_n, "swap": args.swap, "wall_s": round(wall, 1), "judge_calls": calls, "records": records,
           "calls_per_s": round(calls / wall, 3), "unreadable": errors, "exit_code": done.returncode,
           "a_total": pair.get("a_total"), "b_total": pair.get("b_total"), "ratio": pair.get("ratio"),
           "b_wins": pair.get("b_wins"), "ties": pair.get("ties"), "a_wins": pair.get("a_wins"),
           "first_shown_advantage": (result.get("scores") or {}).get("first_shown_advantage"),
           "loadavg_before": load_before, "loadavg_after": load_after}
    print("| questions | judge calls | wall (s) | calls/s | readable reviews | b / a total | b wins / ties / a wins |")
    print("|---|---|---|---|---|---|---|")
    ratio = f"{100 * row['ratio']:.1f} %" if row["ratio"] is not None else "-"
    print(f"| {args.first_n} | {calls} | {row['wall_s']} | {row['calls_per_s']} | {records - errors} of {records} | {ratio} | "
          f"{row['b_wins']} / {row['ties']} / {row['a_wins']} |")
    path = write_results("judge-original", {"machine": info, "args": vars(args), "command": cmd[1:], "result": row}, args.json)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
