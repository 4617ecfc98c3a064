#!/usr/bin/env python
"""Data cleaning end to end: `vicuna data clean` vs FastChat's clean_sharegpt + split_long_conversation.

Both run on the same synthetic ShareGPT HTML corpus (benchmarks/make_sharegpt_corpus.py) with the
same tokenizer (the embedded SmolLM2-135M-Instruct; FastChat gets the transformers-4.44 copy made
by ../shared/peers/fastchat/make_legacy_model.py) and the same --max-length:

  vicuna    python -m vicuna_cli data clean IN -o OUT.json -m MODEL --max-length N
                --blocklist-preset original            (one command: clean + split)
  fastchat  python -m fastchat.data.clean_sharegpt --in IN --out CLEAN.json
            python -m fastchat.data.split_long_conversation --in CLEAN.json --out OUT.json
                --model-name-or-path LEGACY --max-length N

`--blocklist-preset original` gives vicuna FastChat's fixed word filter, so the retained counts
are comparable. Wall time is end to end (process start to exit, both FastChat steps added).
CPU time is that of the whole process tree (workers included); "CPUs used by others" is the share
of the machine other processes took during the run (a shared box: it slows both tools). Peak
memory is the largest sum over the whole process tree, sampled every 50 ms from /proc: RSS and
PSS (PSS splits pages shared by forked workers, so it does not count them twice). Runs
alternate, the order reversed every round (A B, B A, ...), for --rounds rounds; medians are reported.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_data.py --fastchat-venv /tmp/fastchat-venv

Goals: vicuna >= 3x faster end to end; peak memory <= 0.5x FastChat's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, loadavg, machine_info, markdown_table, print_machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers" / "fastchat"
SPEED_GOAL, MEMORY_GOAL = 3.0, 0.5
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def busy_seconds() -> float:
    """CPU time all processes on the machine have used (user + system, all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd`: wall seconds, CPU seconds of its process tree (workers included), CPU seconds
    other processes used meanwhile, and the peak tree RSS/PSS (MB) seen while it ran."""
    peak = {"rss": 0, "pss": 0}
    cpu_before, busy_before = children_cpu(), busy_seconds()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                totals = [memory(p) for p in tree(proc.pid)]
                peak["rss"] = max(peak["rss"], sum(t[0] for t in totals))
                peak["pss"] = max(peak["pss"], sum(t[1] for t in totals))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu_before
    others = max(0.0, busy_seconds() - busy_before - cpu)
    if code != 0:
        sys.exit(f"command failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall": wall, "cpu": cpu, "others_cpu": others, "rss_mb": peak["rss"] / 2**20, "pss_mb": peak["pss"] / 2**20}


def combine(steps: list[dict[str, float]]) -> dict[str, float]:
    """Sequential steps: times add up, peaks are the larger one."""
    wall = sum(s["wall"] for s in steps)
    return {"wall": wall, "cpu": sum(s["cpu"] for s in steps), "rss_mb": max(s["rss_mb"] for s in steps),
            "pss_mb": max(s["pss_mb"] for s in steps), "steps": [round(s["wall"], 2) for s in steps],
            "others_share": sum(s["others_cpu"] for s in steps) / (wall * (os.cpu_count() or 1))}


def count(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return len(json.load(f))


def audit(work: Path, model: Path, max_length: int) -> dict[str, int]:
    """What each tool kept, measured the way training will see it: exchanges (user/assistant
    pairs) before and after splitting, and pieces longer than --max-length once rendered with
    the model's template and tokenized with its tokenizer."""
    from vicuna_cli.data.pipeline import load_token_counter
    from vicuna_cli.data.split import to_messages

    counter = load_token_counter(str(model), None)

    def load(name: str) -> list:
        with open(work / name, encoding="utf-8") as f:
            return json.load(f)

    def too_long(rows: list) -> tuple[int, int]:
        lengths = [len(e) for e in counter.encode_batch([counter.render(to_messages(r["conversations"])) for r in rows])]
        return sum(n > max_length for n in lengths), max(lengths)

    def exchanges(rows: list) -> int:
        return sum(sum(t["from"] == "gpt" for t in r["conversations"]) for r in rows)

    fc_clean, fc_split, vicuna = load("fastchat_clean.json"), load("fastchat_split.json"), load("vicuna.json")
    fc_long, fc_max = too_long(fc_split)
    v_long, v_max = too_long(vicuna)
    return {"fastchat_exchanges_before_split": exchanges(fc_clean), "fastchat_exchanges_after_split": exchanges(fc_split),
            "vicuna_exchanges": exchanges(vicuna), "fastchat_pieces_over_max_length": fc_long, "fastchat_longest_piece": fc_max,
            "vicuna_pieces_over_max_length": v_long, "vicuna_longest_piece": v_max}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="vicuna model name (resolved with vicuna's rules)")
    parser.add_argument("--fastchat-venv", type=Path, default=Path("/tmp/fastchat-venv"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_data"))
    parser.add_argument("--json", default=None, help="results file (default: benchmarks/records/)")
    parser.add_argument("--audit-only", action="store_true", help="only audit the outputs already in --workdir")
    args = parser.parse_args()
    if args.audit_only:
        from vicuna_cli.core.models import resolve

        print(json.dumps(audit(args.workdir, resolve(args.model).path, args.max_length), indent=2))
        return

    from vicuna_cli.core.models import resolve

    info = machine_info()
    print_machine(info)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"sharegpt-{args.conversations}-seed{args.seed}.json"
    if not corpus.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_sharegpt_corpus.py"), str(corpus),
                        "--conversations", str(args.conversations), "--seed", str(args.seed)], check=True)
    model = resolve(args.model).path
    legacy = work / "legacy-model"
    if not legacy.exists():
        subprocess.run(["bash", str(PEERS / "setup.sh"), str(args.fastchat_venv)], check=True)
        subprocess.run([str(args.fastchat_venv / "bin" / "python"), str(PEERS / "make_legacy_model.py"), str(model), str(legacy)], check=True)
    fc_python = str(args.fastchat_venv / "bin" / "python")
    n = str(args.max_length)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {args.conversations} conversations) · model {model} · max-length {n}")

    vicuna_out, fc_clean, fc_out = work / "vicuna.json", work / "fastchat_clean.json", work / "fastchat_split.json"
    commands = {
        "vicuna": [[sys.executable, "-m", "vicuna_cli", "data", "clean", str(corpus), "-o", str(vicuna_out), "-m", str(model),
                    "--max-length", n, "--blocklist-preset", "original", "--overwrite", "--report", str(work / "vicuna_report.json")]],
        "fastchat": [[fc_python, "-m", "fastchat.data.clean_sharegpt", "--in", str(corpus), "--out", str(fc_clean)],
                     [fc_python, "-m", "fastchat.data.split_long_conversation", "--in", str(fc_clean), "--out", str(fc_out),
                      "--model-name-or-path", str(legacy), "--max-length", n]],
    }
    results: dict[str, list[dict]] = {name: [] for name in commands}
    for round_no in range(args.rounds):
        order = list(commands) if round_no % 2 == 0 else list(commands)[::-1]
        for name in order:
            load = loadavg()
            steps = [run(cmd, work / f"{name}-{round_no}-{i}.log") for i, cmd in enumerate(commands[name])]
            result = combine(steps) | {"loadavg_before": load}
            results[name].append(result)
            print(f"round {round_no + 1} {name:8s} {result['wall']:7.1f} s  cpu {result['cpu']:6.1f} s  "
                  f"peak RSS {result['rss_mb']:5.0f} MB  PSS {result['pss_mb']:5.0f} MB  "
                  f"others used {100 * result['others_share']:3.0f}% of the CPUs", flush=True)

    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_mb", "pss_mb", "others_share")}
           for name, runs in results.items()}
    report = json.loads((work / "vicuna_report.json").read_text())
    retained = {"vicuna": count(vicuna_out), "fastchat": count(fc_out), "fastchat_after_clean": count(fc_clean),
                "vicuna_before_split": next(s for s in report["steps"] if s["step"] == "split")["in"]}
    speed = med["fastchat"]["wall"] / med["vicuna"]["wall"]
    rss_ratio = med["vicuna"]["rss_mb"] / med["fastchat"]["rss_mb"]
    pss_ratio = med["vicuna"]["pss_mb"] / med["fastchat"]["pss_mb"]
    print()
    print(markdown_table(
        ["tool", "wall s (median)", "per round", "CPU s", "peak RSS MB", "peak PSS MB", "CPUs used by others", "conversations out"],
        [[name, f"{m['wall']:.1f}", ", ".join(f"{r['wall']:.1f}" for r in results[name]), f"{m['cpu']:.0f}",
          f"{m['rss_mb']:.0f}", f"{m['pss_mb']:.0f}", f"{100 * m['others_share']:.0f}%", retained[name]]
         for name, m in med.items()],
    ))
    print(f"\nspeed-up (fastchat / vicuna wall): {speed:.2f}x (goal >= {SPEED_GOAL}x: {'met' if speed >= SPEED_GOAL else 'NOT met'}); "
          f"CPU time: {med['fastchat']['cpu'] / med['vicuna']['cpu']:.2f}x less")
    print(f"memory (vicuna / fastchat): RSS {rss_ratio:.2f}x, PSS {pss_ratio:.2f}x (goal <= {MEMORY_GOAL}x: "
          f"{'met' if max(rss_ratio, pss_ratio) <= MEMORY_GOAL else 'NOT met'})")
    print(f"retained: vicuna {retained['vicuna_before_split']} before split -> {retained['vicuna']} pieces; "
          f"fastchat {retained['fastchat_after_clean']} after clean -> {retained['fastchat']} pieces")
    retained |= audit(work, model, args.max_length)
    print("audit: " + ", ".join(f"{k} {v}" for k, v in retained.items() if k not in ("vicuna", "fastchat")))
    path = write_results("data", {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                  "median": med, "retained": retained, "speedup": speed, "rss_ratio": rss_ratio,
                                  "pss_ratio": pss_ratio, "vicuna_report": report}, args.json)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
