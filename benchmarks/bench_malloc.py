"""CPU time per step and peak RSS of `vicuna train rm` under glibc malloc settings (train/memory.py).

    python benchmarks/bench_malloc.py --data PAIRS.jsonl [--steps 3] [--settings 128k 1m 4m 32m dynamic]
                                      [--model PATH] [--work-dir /tmp/bench_malloc]

PAIRS.jsonl: preference pairs as `vicuna train rm --data` reads them (bench_rm.py's
work-dir/train.jsonl). Each setting runs `vicuna train rm` in its own fresh process (malloc is set
up once per process), one thread, fp32, batch 8 pairs, --max-length 256, lr 1e-5 constant, seed 0.
The child times every optimizer step with getrusage (user and sys CPU seconds, minor page faults):
CPU time is far less sensitive than wall time to neighbours on a shared machine. A setting reaches
glibc through the environment, which memory.py leaves alone: `Nk`/`Nm` sets
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ to that size; `dynamic` sets a neutral glibc
tunable so memory.py steps aside and glibc's dynamic threshold stays; `default` sets nothing (what
memory.py does today).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(out_dir: str, steps: str, data: str, model: str) -> None:
    from vicuna_cli.cli import app
    from vicuna_cli.train import loop

    timed_steps = []
    step = loop._step

    def timed(*args, **kwargs):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = step(*args, **kwargs)
        after = resource.getrusage(resource.RUSAGE_SELF)
        timed_steps.append({"user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
                            "minflt": after.ru_minflt - before.ru_minflt, "wall": time.perf_counter() - started,
                            "loss": result[0]})
        return result

    loop._step = timed
    app(["train", "rm", "-m", model, "--data", data, "-o", out_dir, "--overwrite", "--max-steps", steps,
         "--global-batch-size", "8", "--max-length", "256", "--learning-rate", "1e-5", "--lr-schedule", "constant",
         "--warmup-steps", "0", "--seed", "0", "--log-every", "1", "--device", "cpu", "--precision", "fp32",
         "--threads", "1"], standalone_mode=False)
    print("RESULT " + json.dumps({"steps": timed_steps,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["OMP_NUM_THREADS"] = "1"
    if setting == "dynamic":
        env["GLIBC_TUNABLES"] = "glibc.malloc.perturb=0"  # glibc's default value: only makes memory.py step aside
    elif setting != "default":
        size = int(setting[:-1]) * {"k": 1 << 10, "m": 1 << 20}[setting[-1].lower()]
        env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(size)
    return env


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["128k", "1m", "4m", "32m", "dynamic"])
    parser.add_argument("--model", default=str(Path(os.environ.get("VICUNA_HOME", "/tmp/vh")) / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_malloc"))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print("| setting | user s/step | sys s/step | minor faults/step | peak RSS | losses | load at start |")
    print("|---|---:|---:|---:|---:|---|---|")
    for setting in args.settings:
        load = open("/proc/loadavg").read().split()[0]
        done = subprocess.run([sys.executable, __file__, "--child", str(args.work_dir / "run"), str(args.steps),
                               str(args.data), args.model], env=environment(setting), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{setting}: the run failed:\n{done.stderr[-2000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        steps = result["steps"]
        mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
        print(f"| {setting} | {mean('user'):.2f} | {mean('sys'):.2f} | {mean('minflt') / 1e6:.2f} M | "
              f"{result['peak_rss_mb']:,.0f} MB | {', '.join(format(s['loss'], '.4f') for s in steps)} | {load} |", flush=True)


if __name__ == "__main__":
    main()
