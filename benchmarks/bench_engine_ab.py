#!/usr/bin/env python
"""Decode speed of this checkout's native Llama module vs another checkout's, in one process.

Both models are loaded from the same converted checkpoint (`models.resolve`: the embedded alias by
default) with their own `native_llama.load_native`, and run by the same engine (this checkout's
`generate.Engine`), greedy, batch 1, --tokens new tokens (EOS ignored), in alternating order
(A B, B A, ...). The greedy token ids of the two must be equal (a lossless change), and are
checked every round.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_engine_ab.py --baseline /path/to/main --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, ForeignCpu, loadavg, machine_info, print_machine, summary, write_results  # noqa: E402

PROMPT = "Write a long story about a dragon."


def native_module(checkout: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, checkout / "vicuna_cli" / "core" / "native_llama.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (its vicuna_cli/core/native_llama.py)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="fixed torch threads (default: adaptive)")
    parser.add_argument("--rounds", "-n", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from vicuna_cli.core import models
    from vicuna_cli.core import native_llama as this_native  # this checkout's, as a package module
    from vicuna_cli.core.generate import Engine

    info = machine_info()
    print("# Native engine A/B: baseline checkout vs this one\n")
    print_machine(info)
    lm = models.load(args.model, device="cpu", dtype=args.dtype, progress=False, implementation="native")
    dtype = getattr(torch, args.dtype)
    arms = {"baseline": native_module(args.baseline, "native_baseline").load_native(lm.path, dtype, "cpu"),
            "this": this_native.load_native(lm.path, dtype, "cpu")}
    engines = {}
    for arm, model in arms.items():
        engines[arm] = Engine(model, lm.tokenizer, lm.context_length, threads=args.threads)
        engines[arm].stop_token_ids = set()
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                            add_generation_prompt=True, tokenize=False)
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"model {lm.name} · {args.dtype} · threads {args.threads or 'adaptive'} · prompt {len(ids)} tokens · "
          f"{args.tokens} new tokens · greedy · batch 1\n", flush=True)

    from vicuna_cli.core.generate import SamplingParams

    def run(arm: str, tokens: int) -> dict:
        gen = engines[arm].generate(ids, SamplingParams(temperature=0.0, max_new_tokens=tokens))
        for _ in gen:
            pass
        return {"decode_tps": gen.stats.tokens_per_second, "ttft": gen.stats.time_to_first_token, "ids": gen.output_ids}

    for arm in arms:
        run(arm, 8)
    rounds = {arm: [] for arm in arms}
    foreign = []
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        with ForeignCpu(count_iowait=True) as fc:
            results = {arm: run(arm, args.tokens) for arm in order}
        foreign.append(fc.fraction)
        same = results["baseline"]["ids"] == results["this"]["ids"]
        for arm in arms:
            rounds[arm].append(results[arm])
        print(f"round {r + 1} ({' '.join(order)}): " + " · ".join(f"{a} {results[a]['decode_tps']:5.1f} tok/s" for a in order)
              + f" · ids {'equal' if same else 'DIFFER'} · other processes {fc.fraction:.0%} of the CPUs", flush=True)
        if not same:
            sys.exit("error: the two engines' greedy tokens differ")
    figures = {arm: {"decode_tps": summary([x["decode_tps"] for x in v]), "ttft": summary([x["ttft"] for x in v])}
               for arm, v in rounds.items()}
    paired = [b["decode_tps"] / a["decode_tps"] for a, b in zip(rounds["baseline"], rounds["this"])]
    print(f"\nmedian decode tok/s: baseline {figures['baseline']['decode_tps']['median']:.1f} · this "
          f"{figures['this']['decode_tps']['median']:.1f} · this/baseline per round: median {statistics.median(paired):.2f} "
          f"({min(paired):.2f}-{max(paired):.2f})")
    print(f"median first token (s): baseline {figures['baseline']['ttft']['median']:.3f} · this {figures['this']['ttft']['median']:.3f}")
    print(f"other processes per round: {', '.join(f'{x:.0%}' for x in foreign)} · load average at end: {loadavg()}")
    data = {"benchmark": "engine-ab", "machine": {**info, "loadavg_at_end": loadavg()},
            "settings": {k: str(v) for k, v in vars(args).items()}, "figures": figures, "paired_ratio": paired,
            "foreign_cpu_per_round": foreign}
    print(f"results: {write_results('engine-ab', data, args.json)}")


if __name__ == "__main__":
    main()
