#!/usr/bin/env python
"""Total output tokens/s of the continuous-batching BatchEngine vs the batch-1 Engine.

The checkpoint (default: the embedded alias) is loaded with `vicuna_cli.core.models.load`
(on CPU: the native Llama model). Prompts are chat-templated user turns from a small fixed set of
questions (each request a different prompt, so prompt lengths differ). Greedy, exactly --tokens new
tokens per request (the stop tokens are emptied so nothing stops at EOS).

  engine     `Engine.generate` (what `vicuna chat` runs), one request at a time: the batch-1
             baseline; its rate is the same for any number of requests served one after another.
  batch C    `BatchEngine(max_batch_size=C)`: C requests submitted at once, `step()` driven in
             this thread until all finish (no scheduler thread, so the figure is the engine's own).

Total output tok/s = output tokens of all requests / wall time from the first submit to the last
token (prefill included). Also reported: median time to first token and median inter-token
gap (from per-step timestamps). Rounds interleave the contenders (order reversed every other
round); a round during which other processes took more than --max-foreign of the CPUs is repeated
(--retries), and --wait-idle waits for a quiet machine before each round.

Correctness: with greedy decoding, the first --check requests' tokens are compared with their
batch-1 tokens (in bf16, batched matmuls may round differently in the last bits, so a late divergence is
possible there; fp32 is expected to match).

    VICUNA_HOME=/tmp/vh python benchmarks/bench_batch.py --dtype bfloat16 float32 --concurrency 1 4 16 32

Goal: total output tok/s at concurrency 16 >= 4 x FastChat's 17.7 tok/s (measured on this machine
for the serving benchmark) = 70.8 tok/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_MODEL,
    ForeignCpu,
    loadavg,
    machine_info,
    markdown_table,
    print_machine,
    summary,
    wait_for_idle,
    write_results,
)

FASTCHAT_C16 = 17.7  # tok/s, FastChat serving the embedded model at concurrency 16 (DESIGN.md)
GOAL_C16 = 4 * FASTCHAT_C16

QUESTIONS = [
    "Write a long story about a dragon.",
    "Explain how a CPU executes a program, step by step.",
    "What are the main differences between Python and C? Give examples.",
    "Describe a walk through Paris in spring.",
    "Give me ten tips for learning a new language.",
    "Summarise the history of the Roman Empire.",
    "How do vaccines train the immune system?",
    "Write a poem about the sea and the wind.",
]


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            question = f"({i // len(QUESTIONS) + 1}) {question}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def run_engine(engine, prompt: list[int], tokens: int) -> dict:
    from vicuna_cli.core.generate import SamplingParams

    start = time.perf_counter()
    gen = engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=tokens))
    for _ in gen:
        pass
    wall = time.perf_counter() - start
    return {"ids": [list(gen.output_ids)], "tokens": gen.stats.output_tokens, "wall": wall,
            "tps": gen.stats.output_tokens / wall, "ttft": [gen.stats.time_to_first_token],
            "itl": 1.0 / gen.stats.tokens_per_second if gen.stats.tokens_per_second else None}


def run_batch(lm, prompts: list[list[int]], tokens: int, prefill_chunk: int) -> dict:
    from vicuna_cli.core.batch import BatchEngine
    from vicuna_cli.core.generate import SamplingParams

    engine = BatchEngine(lm.model, lm.tokenizer, lm.context_length, max_batch_size=len(prompts),
                         max_queue=len(prompts), prefill_chunk=prefill_chunk)
    engine.stop_token_ids = set()
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens)
    start = time.perf_counter()
    requests = [engine.submit(p, params) for p in prompts]
    stamps: list[list[float]] = [[] for _ in requests]
    ids: list[list[int]] = [[] for _ in requests]
    while engine.step():
        now = time.perf_counter()
        for i, request in enumerate(requests):
            for event in request.drain():
                if event.token_ids:
                    stamps[i].append(now)
                    ids[i].extend(event.token_ids)
    wall = time.perf_counter() - start
    total = sum(r.stats.output_tokens for r in requests)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"ids": ids, "tokens": total, "wall": wall, "tps": total / wall,
            "ttft": [r.stats.time_to_first_token for r in requests],
            "itl": statistics.median(gaps) if gaps else None,
            "finish": sorted({r.stats.finish_reason for r in requests})}


def bench_dtype(args, dtype: str) -> dict:
    import torch

    from vicuna_cli.core import models
    from vicuna_cli.core.generate import Engine

    lm = models.load(args.model, device="cpu", dtype=dtype, progress=False, implementation=args.implementation)
    prompts = make_prompts(lm.tokenizer, max(args.concurrency))
    print(f"\n## dtype {lm.dtype} · model {lm.implementation} · torch threads {torch.get_num_threads()} · "
          f"prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))} tokens · {args.tokens} new tokens each",
          flush=True)
    engine = Engine(lm.model, lm.tokenizer, lm.context_length)
    engine.stop_token_ids = set()
    arms = ["engine", *[f"batch {c}" for c in args.concurrency]]

    def run(arm: str) -> dict:
        if arm == "engine":
            return run_engine(engine, prompts[0], args.tokens)
        c = int(arm.split()[1])
        return run_batch(lm, prompts[:c], args.tokens, args.prefill_chunk)

    # Greedy references: the first --check prompts at batch 1 (for the token-for-token comparison).
    references = [run_engine(engine, p, args.tokens)["ids"][0] for p in prompts[: args.check]]
    for _ in range(args.warmup):
        run_engine(engine, prompts[0], 8)
        run_batch(lm, prompts[:4], 8, args.prefill_chunk)

    rounds: dict[str, list[dict]] = {arm: [] for arm in arms}
    foreign, repeats = [], 0
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        for attempt in range(args.retries + 1):
            if args.wait_idle:
                status = wait_for_idle(args.wait_idle)
                if not status.startswith("idle"):
                    print(f"warning: {status}", flush=True)
            with ForeignCpu(count_iowait=True) as fc:
                results = {arm: run(arm) for arm in order}
            if fc.fraction <= args.max_foreign or attempt == args.retries:
                break
            repeats += 1
            print(f"round {r + 1}: other processes took {fc.fraction:.0%} of the CPUs; repeating", flush=True)
        for arm in arms:
            rounds[arm].append(results[arm])
        foreign.append(fc.fraction)
        print(f"round {r + 1}: " + " · ".join(f"{arm} {results[arm]['tps']:.1f}" for arm in arms)
              + f" tok/s · CPU taken by others {fc.fraction:.0%}", flush=True)

    clean = [f <= args.max_foreign for f in foreign]
    if not any(clean):
        print("warning: every round shared the CPUs with other processes: figures are unreliable", flush=True)
        clean = [True] * len(foreign)
    result = {"dtype": lm.dtype, "implementation": lm.implementation, "torch_threads": torch.get_num_threads(),
              "prompt_tokens": [len(p) for p in prompts], "foreign_cpu_per_round": foreign,
              "rounds_repeated_for_noise": repeats, "rounds_used": sum(clean), "arms": {}}
    base = statistics.median(x["tps"] for x, ok in zip(rounds["engine"], clean) if ok)
    for arm in arms:
        used = [x for x, ok in zip(rounds[arm], clean) if ok]
        matches = []
        for x in rounds[arm]:
            matches.append(sum(ids == ref for ids, ref in zip(x["ids"], references)))
        ttfts = [t for x in used for t in x["ttft"]]
        itls = [x["itl"] for x in used if x["itl"]]
        result["arms"][arm] = {
            "tps": summary([x["tps"] for x in used]),
            "speedup_vs_engine": statistics.median(x["tps"] for x in used) / base,
            "ttft_median": statistics.median(ttfts),
            "itl_median": statistics.median(itls) if itls else None,
            "requests": len(rounds[arm][0]["ids"]),
            "checked": min(len(rounds[arm][0]["ids"]), len(references)),
            "greedy_equal_to_batch1": min(matches),
            "rounds": [{k: x[k] for k in ("tokens", "wall", "tps", "ttft", "itl")} for x in rounds[arm]],
        }
    c16 = result["arms"].get("batch 16")
    result["goal_c16"] = None if c16 is None else c16["tps"]["median"] >= GOAL_C16
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--implementation", default="auto", choices=["auto", "native", "transformers"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (forced: EOS ignored)")
    parser.add_argument("--rounds", "-n", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", type=int, default=4, help="compare this many requests with their batch-1 greedy tokens")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="BatchEngine prefill_chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--max-foreign", type=float, default=0.10)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print("# Continuous batching benchmark: BatchEngine vs batch-1 Engine\n")
    print_machine(info)
    results = [bench_dtype(args, dtype) for dtype in args.dtype]

    print("\nTotal output tokens/s (median of rounds, min-max), speed-up vs the batch-1 engine, median TTFT and ITL:\n")
    rows = []
    for r in results:
        for arm, a in r["arms"].items():
            t = a["tps"]
            rows.append([r["dtype"], arm, a["requests"], f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]",
                         f"{a['speedup_vs_engine']:.2f}x", f"{a['ttft_median']:.2f} s",
                         f"{a['itl_median'] * 1000:.0f} ms" if a["itl_median"] else "-",
                         f"{a['greedy_equal_to_batch1']}/{a['checked']}"])
    print(markdown_table(["dtype", "contender", "requests", "total tok/s", "vs engine", "TTFT p50", "ITL p50",
                          "greedy = batch-1"], rows))
    print()
    for r in results:
        if r["goal_c16"] is not None:
            print(f"{r['dtype']}: batch 16 total {r['arms']['batch 16']['tps']['median']:.1f} tok/s -> goal >= "
                  f"{GOAL_C16:.1f} (4 x FastChat {FASTCHAT_C16}): {'PASS' if r['goal_c16'] else 'FAIL'}")
        print(f"{r['dtype']}: CPU taken by others per round {', '.join(f'{x:.0%}' for x in r['foreign_cpu_per_round'])} "
              f"({r['rounds_repeated_for_noise']} repeated, {r['rounds_used']} used)")
    print(f"load average at end: {loadavg()}")
    if not args.no_json:
        data = {"benchmark": "batch", "machine": {**info, "loadavg_at_end": loadavg()}, "settings": vars(args),
                "results": results}
        print(f"results: {write_results('batch', data, args.json)}")


if __name__ == "__main__":
    main()
