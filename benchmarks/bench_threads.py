#!/usr/bin/env python
"""Decode speed on a busy machine: the adaptive thread count (core/threads.py) vs torch's fixed
default, idle and with one CPU-bound neighbour (`python -c 'while True: pass'`).

One model (default: the embedded alias, the dtype vicuna picks), two Engines over it:

  fixed     Engine(threads=<all usable CPUs>): what vicuna did before, torch's default count
  adaptive  Engine(threads=None): the default now, one thread per CPU the others leave free

Each round runs both engines in both conditions, greedy, batch 1, --tokens new tokens (EOS
ignored), the arms and the conditions in alternating order (A B, B A, ...). The neighbour is
started before a "busy" block and killed after it, so an engine meets it mid-conversation as in a
chat on a laptop; each engine keeps its state between runs, as over the turns of a chat.

Reported: decode tok/s (tokens after the first / time after the first), median per arm and
condition, busy / idle per arm (goal >= 0.5 for adaptive), and how much CPU processes other than
this one and its neighbour took meanwhile (a shared machine: those figures are noise).

    VICUNA_HOME=/tmp/vh python benchmarks/bench_threads.py --rounds 5 --tokens 64 --wait-idle 120

On a machine that other sessions keep busy (Linux autogroup scheduling: each session gets a fair
share), `--autogroup-nice -10` (root) weights this session and the neighbour's ~9x above them, which
approximates the idle machine the goal is defined on; the others' share is still reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_MODEL, ForeignCpu, loadavg, machine_info, markdown_table, print_machine, summary, wait_for_idle, write_results,
)

GOAL = 0.5
PROMPT = "Write a long story about a dragon."


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_autogroup_nice(pid: int | str, nice: int) -> None:
    """The scheduler weight of a whole session (Linux autogroup: with it, `nice` only ranks a
    session's own processes, and each session gets a fair share of the CPUs)."""
    Path(f"/proc/{pid}/autogroup").write_text(str(nice))


class Neighbour:
    """A CPU-bound process in a session of its own, as a browser or a test run in another
    terminal is (in this session it would only split this session's CPU share); its CPU time is
    counted apart."""

    def __init__(self, autogroup_nice: int | None, own_session: bool = True):
        self.autogroup_nice = autogroup_nice
        self.own_session = own_session

    def __enter__(self) -> "Neighbour":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=self.own_session)
        if self.autogroup_nice is not None and self.own_session:
            set_autogroup_nice(self.proc.pid, self.autogroup_nice)
        time.sleep(0.3)  # running before the engine's next step
        self.start = process_cpu_seconds(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = process_cpu_seconds(self.proc.pid) - self.start
        self.proc.kill()
        self.proc.wait()


def run(engine, ids: list[int], tokens: int) -> dict:
    from vicuna_cli.core.generate import SamplingParams

    gen = engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=tokens))
    for _ in gen:
        pass
    return {"decode_tps": gen.stats.tokens_per_second, "tokens": gen.stats.output_tokens,
            "threads_at_end": engine.batch.threads.threads, "ids": list(gen.output_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", "-n", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each block, wait up to this long for other processes to leave the CPUs idle")
    parser.add_argument("--autogroup-nice", type=int, default=None, metavar="N",
                        help="give this session and the neighbour's this autogroup nice (e.g. -10, needs root): on a "
                             "machine other sessions keep busy, that approximates an idle machine with one neighbour")
    parser.add_argument("--neighbour-session", choices=["own", "same"], default="own",
                        help="own: the neighbour runs in a session of its own (another terminal, a browser); same: in "
                             "this one (`python -c ... &` from the same shell), where it splits this session's share")
    parser.add_argument("--json", metavar="PATH", help="JSON output path (default: benchmarks/records/threads-<time>.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from vicuna_cli.core import models
    from vicuna_cli.core.generate import Engine
    from vicuna_cli.core.threads import usable_cpus

    if args.autogroup_nice is not None:
        set_autogroup_nice("self", args.autogroup_nice)
    info = machine_info()
    print("# Decode speed with a busy neighbour: adaptive threads vs fixed\n")
    print_machine(info)
    lm = models.load(args.model, device="cpu", dtype=args.dtype, progress=False)
    cpus = usable_cpus()
    engines = {"fixed": Engine(lm.model, lm.tokenizer, lm.context_length, threads=cpus),
               "adaptive": Engine(lm.model, lm.tokenizer, lm.context_length, threads=None)}
    for engine in engines.values():
        engine.stop_token_ids = set()
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"model {lm.name} · {lm.dtype} · {lm.implementation} · {cpus} usable CPUs · prompt {len(ids)} tokens · "
          f"{args.tokens} new tokens · greedy · batch 1\n", flush=True)
    for engine in engines.values():  # warm-up
        run(engine, ids, 8)

    results: dict[str, dict[str, list[dict]]] = {arm: {"idle": [], "busy": []} for arm in engines}
    others: dict[str, list[float]] = {"idle": [], "busy": []}
    reference = None
    for r in range(args.rounds):
        conditions = ("idle", "busy") if r % 2 == 0 else ("busy", "idle")
        arms = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for condition in conditions:
            if args.wait_idle:
                status = wait_for_idle(args.wait_idle)
                if not status.startswith("idle"):
                    print(f"warning: {status}", flush=True)
            with ForeignCpu(count_iowait=True) as fc:
                start = time.monotonic()
                if condition == "busy":
                    with Neighbour(args.autogroup_nice, args.neighbour_session == "own") as neighbour:
                        runs = {arm: run(engines[arm], ids, args.tokens) for arm in arms}
                    neighbour_share = neighbour.cpu / ((time.monotonic() - start) * (os.cpu_count() or 1))
                else:
                    runs = {arm: run(engines[arm], ids, args.tokens) for arm in arms}
                    neighbour_share = 0.0
            foreign = max(0.0, fc.fraction - neighbour_share)
            others[condition].append(foreign)
            for arm in arms:
                reference = reference or runs[arm]["ids"]
                if runs[arm]["ids"] != reference:
                    sys.exit(f"error: {arm} ({condition}) produced different greedy tokens")
                results[arm][condition].append(runs[arm])
            print(f"round {r + 1} {condition:4s} ({' '.join(arms)}): "
                  + " · ".join(f"{arm} {runs[arm]['decode_tps']:5.1f} tok/s ({runs[arm]['threads_at_end']} thr)" for arm in arms)
                  + f" · other processes {foreign:.0%} of the CPUs"
                  + (f" · neighbour {neighbour_share:.0%}" if condition == "busy" else ""), flush=True)

    rows, figures = [], {}
    for arm in engines:
        idle = [x["decode_tps"] for x in results[arm]["idle"]]
        busy = [x["decode_tps"] for x in results[arm]["busy"]]
        ratio = statistics.median(busy) / statistics.median(idle)
        figures[arm] = {"idle": summary(idle), "busy": summary(busy), "busy_over_idle": ratio,
                        "threads_at_end": {c: [x["threads_at_end"] for x in results[arm][c]] for c in ("idle", "busy")}}
        rows.append([arm, f"{statistics.median(idle):.1f} [{min(idle):.1f}-{max(idle):.1f}]",
                     f"{statistics.median(busy):.1f} [{min(busy):.1f}-{max(busy):.1f}]", f"{ratio:.2f}"])
    print("\nDecode tok/s, median [min-max] of rounds:\n")
    print(markdown_table(["engine threads", "idle", "one busy neighbour", "busy / idle"], rows))
    ok = figures["adaptive"]["busy_over_idle"] >= GOAL
    print(f"\nadaptive busy / idle = {figures['adaptive']['busy_over_idle']:.2f} -> goal >= {GOAL}: {'PASS' if ok else 'FAIL'}")
    print(f"other processes' CPU share per block: idle {', '.join(f'{x:.0%}' for x in others['idle'])}; "
          f"busy {', '.join(f'{x:.0%}' for x in others['busy'])} (neighbour excluded)")
    print(f"load average at end: {loadavg()}")
    data = {"benchmark": "threads", "machine": {**info, "loadavg_at_end": loadavg()}, "settings": vars(args),
            "model": {"name": lm.name, "dtype": lm.dtype, "implementation": lm.implementation}, "cpus": cpus,
            "goal_busy_over_idle": GOAL, "figures": figures, "other_processes_share": others,
            "rounds": {arm: {c: [{k: x[k] for k in ("decode_tps", "tokens", "threads_at_end")} for x in v] for c, v in d.items()}
                       for arm, d in results.items()}}
    print(f"results: {write_results('threads', data, args.json)}")


if __name__ == "__main__":
    main()
