#!/usr/bin/env python
"""The fused loss alone: vicuna_kernels.linear_cross_entropy vs the plain LM-head + cross-entropy.

Forward + backward of the summed token loss for N tokens, hidden size H, vocabulary V (default
SmolLM2's: H 576, V 49152), inputs in bf16 or fp32:

  plain   logits = F.linear(hidden, weight); F.cross_entropy(logits.float(), labels, reduction="sum")
          (what transformers' causal-LM loss does), then backward
  fused   vicuna_kernels.linear_cross_entropy(hidden, weight, labels) (default chunk size), backward

Both produce the gradients of hidden and weight; the peak includes them.

Every measurement is a fresh subprocess for one arm (so no allocator state or page reuse carries
over from the other arm): it builds the inputs, then for each of --repeats runs frees the previous
gradients, resets the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`), runs forward +
backward, and reads VmHWM from /proc/self/status. Peak memory = VmHWM - VmRSS just before the run
(torch's CPU allocator does not cache, so RSS tracks live tensors). Time = the median of the runs
after the first (the first pays one-time oneDNN set-up). Arms alternate in order each round
(fused plain, plain fused, ...), and a run during which other processes took more than
--max-foreign of the CPUs is repeated (--retries).

    python benchmarks/bench_fused_loss.py --tokens 2048 8192 --dtype bfloat16 float32 --rounds 3

Goals (issue #4): peak memory <= 0.25x the plain loss's, speed >= 0.9x (plain time / fused time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ForeignCpu,
    loadavg,
    machine_info,
    markdown_table,
    print_machine,
    wait_for_idle,
    write_results,
)

ARMS = ("fused", "plain")
MEMORY_GOAL = 0.25
SPEED_GOAL = 0.9


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import gc

    import torch
    import torch.nn.functional as F

    from vicuna_kernels import linear_cross_entropy

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens[0], args.hidden, generator=g).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens[0],), generator=g)
    if args.supervised < 1.0:
        labels[torch.rand(args.tokens[0], generator=g) >= args.supervised] = -100

    def plain():
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")

    def fused():
        return linear_cross_entropy(hidden, weight, labels, chunk_size=args.chunk_size)

    run = fused if args.worker == "fused" else plain
    times, peaks = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        gc.collect()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        start = time.perf_counter()
        loss = run()
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append((_status_kib("VmHWM") - before) / 1024)
        loss_value = float(loss)
        del loss
    print(json.dumps({"times": times, "peaks_mib": peaks, "loss": loss_value}))


def run_arm(arm: str, tokens: int, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", arm, "--tokens", str(tokens), "--dtype", dtype,
        "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--repeats", str(args.repeats),
        "--supervised", str(args.supervised),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    for attempt in range(args.retries + 1):
        with ForeignCpu() as fc:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{arm} worker failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["foreign"] = fc.fraction
        if fc.fraction <= args.max_foreign or attempt == args.retries:
            result["attempts"] = attempt + 1
            return result
        print(f"  {arm}: other processes took {fc.fraction:.0%} of the CPUs; repeating", flush=True)
    raise AssertionError("unreachable")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    p.add_argument("--supervised", type=float, default=1.0, help="fraction of tokens with a label (rest -100)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="forward+backward runs per subprocess")
    p.add_argument("--max-foreign", type=float, default=0.05)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to this many seconds for an idle machine")
    p.add_argument("--json", default=None, help="where to write the JSON record")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.dtype = args.dtype[0]
        return worker(args)

    info = machine_info()
    print_machine(info)
    info["idle"] = wait_for_idle(args.wait_idle)
    print(f"machine state: {info['idle']}")
    from vicuna_kernels import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(args.vocab)
    print(f"vocab {args.vocab}, hidden {args.hidden}, chunk {chunk} tokens, supervised {args.supervised:.0%}, "
          f"{args.rounds} rounds x {args.repeats} runs per arm\n", flush=True)
    results = []
    for tokens in args.tokens:
        for dtype in args.dtype:
            per_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
            for r in range(args.rounds):
                for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                    res = run_arm(arm, tokens, dtype, args)
                    per_arm[arm].append(res)
                    warm = res["times"][1:] or res["times"]
                    print(f"N={tokens} {dtype} round {r + 1} {arm:5}: {statistics.median(warm):7.3f} s, "
                          f"peak +{max(res['peaks_mib']):7.1f} MiB, foreign CPU {res['foreign']:.0%}, "
                          f"load {loadavg()}", flush=True)
            row = {"tokens": tokens, "dtype": dtype, "chunk": chunk}
            for arm in ARMS:
                warm = [statistics.median(x["times"][1:] or x["times"]) for x in per_arm[arm]]
                row[f"{arm}_s"] = statistics.median(warm)
                row[f"{arm}_s_all"] = warm
                row[f"{arm}_peak_mib"] = statistics.median(max(x["peaks_mib"]) for x in per_arm[arm])
                row[f"{arm}_loss"] = per_arm[arm][0]["loss"]
                row[f"{arm}_foreign_max"] = max(x["foreign"] for x in per_arm[arm])
            row["memory_ratio"] = row["fused_peak_mib"] / row["plain_peak_mib"]
            row["speed_ratio"] = row["plain_s"] / row["fused_s"]
            row["loss_rel_diff"] = abs(row["fused_loss"] - row["plain_loss"]) / abs(row["plain_loss"])
            results.append(row)

    print()
    print(markdown_table(
        ["tokens", "dtype", "plain peak MiB", "fused peak MiB", "memory ratio", "plain s", "fused s",
         "speed ratio", "loss rel. diff", "max foreign CPU"],
        [[r["tokens"], r["dtype"], f"{r['plain_peak_mib']:.0f}", f"{r['fused_peak_mib']:.0f}",
          f"**{r['memory_ratio']:.3f}**", f"{r['plain_s']:.2f}", f"{r['fused_s']:.2f}", f"**{r['speed_ratio']:.2f}**",
          f"{r['loss_rel_diff']:.1e}", f"{max(r['plain_foreign_max'], r['fused_foreign_max']):.0%}"] for r in results],
    ))
    ok_mem = all(r["memory_ratio"] <= MEMORY_GOAL for r in results)
    ok_speed = all(r["speed_ratio"] >= SPEED_GOAL for r in results)
    print(f"\nmemory <= {MEMORY_GOAL}x plain: {'pass' if ok_mem else 'FAIL'}; "
          f"speed >= {SPEED_GOAL}x plain: {'pass' if ok_speed else 'FAIL'}; load at end {loadavg()}")
    path = write_results("fused_loss", {"machine": info, "args": vars(args), "results": results}, args.json)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
