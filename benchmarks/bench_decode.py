#!/usr/bin/env python
"""Decode speed: vicuna's streaming Engine vs a plain `model.generate` on the same checkpoint.

The checkpoint (default: the embedded alias) is loaded with `vicuna_cli.core.models.load`, so the
dtype is the one vicuna picks (bf16 on CPUs with native bf16, else fp32; `--dtype float32` etc.
to choose). Same prompt (a chat-templated request for a long answer, rendered with the
transformers tokenizer's `apply_chat_template`), greedy, batch 1, exactly --tokens new tokens:

  engine      Engine(model, tokenizer, context).generate(prompt_ids, SamplingParams(temperature=0))
              over the model `models.load` gives by default (`--implementation auto`: on CPU the
              native Llama module of core/native_llama.py, else transformers) — what `vicuna chat`
              runs. Consumed as a stream of text deltas (detokenizing is part of its work), with
              `stop_token_ids` emptied so that it does not stop at EOS.
  engine-none the same Engine over the same native model with `--quantize none` (the lossless
              bf16 weights), when `engine` runs int8 weights (`--quantize auto` picks them on a
              CPU with native bf16; core/quantize.py). Only when the two differ.
  engine+hf   the same Engine loop over the transformers model (a control: engine loop overhead
              vs model implementation). Only when `engine` is not already the transformers model.
  generate    transformers' model.generate(..., do_sample=False, min_new_tokens=N,
              max_new_tokens=N) on the transformers model, with a streamer that only timestamps.
  llama.cpp   with --peers: the tools users compare vicuna with, on the same checkpoint converted
  ct2-*       once (llama-cpp-python on a Q4_1 GGUF; CTranslate2 float32 and int8), each in a
              worker process of a separate benchmark venv (peers_decode.py; `--setup` builds it),
              fed the same prompt ids, --threads or 2 threads. Goal: vicuna >= 0.5x llama.cpp.

Decode speed = (N - 1) tokens / time from the first new token to the last: prefill excluded, the
same definition as the engine's own `stats.tokens_per_second`. End to end (prompt in, N tokens
out) is reported too. The contenders are interleaved for --rounds rounds after a warm-up; by
default the order flips every round (A B C, C B A, ...) so that none always runs first
(--order fixed: A B C, A B C, ...). A round during which other processes took the CPUs is
repeated (see --max-foreign, --retries, --wait-idle): a shared 2-core box otherwise measures
the neighbours.

Correctness: in greedy mode the engine's token ids must equal model.generate's. Checked with both
stopping at EOS as they normally do (at most N tokens), and on the forced-length runs.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_decode.py --dtype auto float32 --wait-idle 300
    VICUNA_HOME=/tmp/vh python benchmarks/bench_decode.py --no-engine-hf   # int8 vs none vs generate
    VICUNA_HOME=/tmp/vh python benchmarks/bench_decode.py --no-engine-hf --peers llama.cpp ct2

Goals (issue #16): engine / generate decode speed ratio >= 2.5, and >= 40 tok/s.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_MODEL,
    ForeignCpu,
    decode_timing,
    loadavg,
    machine_info,
    markdown_table,
    print_machine,
    summary,
    wait_for_idle,
    write_results,
)
from peers_decode import PeerError, PeerWorker, parse_peers, peer_label  # noqa: E402

PROMPT = "Write a long story about a dragon."
RATIO_GOAL = 2.5
TPS_GOAL = 40.0
PEER_GOAL = 0.5  # vicuna / llama.cpp decode tok/s (issue #16)


class TimingStreamer:
    """A `model.generate` streamer that only records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-templated prompt, tokenized as vicuna's LocalBackend does for a Jinja template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load(model: str, dtype: str, implementation: str | None, quantize: str = "none"):
    from vicuna_cli.core import models

    kwargs = dict(device="cpu", dtype=dtype, progress=False)
    if "quantize" in inspect.signature(models.load).parameters:
        kwargs["quantize"] = quantize
    elif quantize not in ("none", "auto"):
        sys.exit("error: this vicuna has no --quantize choice")
    if "implementation" in inspect.signature(models.load).parameters:
        kwargs["implementation"] = implementation or "auto"
    elif implementation not in (None, "auto", "transformers"):
        sys.exit("error: this vicuna has no --implementation choice (only transformers)")
    lm = models.load(model, **kwargs)
    lm.implementation = getattr(lm, "implementation", "transformers")
    lm.quantization = getattr(lm, "quantization", "none")
    return lm


def run_engine(engine, ids: list[int], tokens: int) -> dict:
    from vicuna_cli.core.generate import SamplingParams

    start = time.perf_counter()
    gen = engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=tokens))
    for _ in gen:
        pass
    wall = time.perf_counter() - start
    s = gen.stats
    return {
        "ids": list(gen.output_ids),
        "tokens": s.output_tokens,
        "decode_tps": s.tokens_per_second,
        "decode_time": s.total_time - (s.time_to_first_token or 0.0),
        "ttft": s.time_to_first_token,
        "wall": wall,
        "e2e_tps": s.output_tokens / wall,
        "finish": s.finish_reason,
    }


def run_generate(model, tokenizer, ids: list[int], tokens: int, force: bool) -> dict:
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    streamer = TimingStreamer()
    kwargs = dict(min_new_tokens=tokens) if force else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer,
            **kwargs,
        )
    return decode_timing(out[0, len(ids):].tolist(), streamer.times, start, time.perf_counter() - start)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def verdict(a: list[int], b: list[int]) -> str:
    d = first_difference(a, b)
    return "MATCH" if d is None else f"DIFFER from token {d}"


def bench_dtype(args, dtype: str, peers: dict[str, PeerWorker]) -> dict:
    import torch

    from vicuna_cli.core.generate import Engine

    lm = load(args.model, dtype, args.implementation, args.quantize)
    lossless = load(args.model, dtype, args.implementation, "none") if lm.quantization != "none" else None
    hf = lm if lm.implementation == "transformers" else load(args.model, dtype, "transformers")
    if hf.dtype != lm.dtype:
        sys.exit(f"error: the two loads picked different dtypes ({lm.dtype} vs {hf.dtype})")
    ids = prompt_ids(hf.tokenizer, args.prompt)
    own_ids = prompt_ids(lm.tokenizer, args.prompt) if lm is not hf else ids
    print(
        f"\n## dtype {lm.dtype} (asked: {dtype}) · engine model: {lm.implementation}, weights {lm.quantization} · torch threads "
        f"{torch.get_num_threads()} · prompt {len(ids)} tokens · {args.tokens} new tokens",
        flush=True,
    )
    if own_ids != ids:
        print(f"note: vicuna's {lm.implementation} tokenizer renders the prompt differently ({len(own_ids)} ids)")

    def engine_for(loaded, ignore_eos: bool):
        e = Engine(loaded.model, loaded.tokenizer, loaded.context_length, threads=args.threads or None)
        if ignore_eos:
            e.stop_token_ids = set()  # generate exactly --tokens tokens
        return e

    arms = {"engine": (lm, engine_for(lm, True))}
    if lossless is not None:
        arms["engine-none"] = (lossless, engine_for(lossless, True))
    if lm is not hf and not args.no_engine_hf:
        arms["engine+hf"] = (hf, engine_for(hf, True))
    eos = set(engine_for(lm, False).stop_token_ids)

    def run(arm: str, tokens: int) -> dict:
        if arm == "generate":
            return run_generate(hf.model, hf.tokenizer, ids, tokens, force=True)
        if arm in peers:
            return peers[arm].run(ids, tokens)
        return run_engine(arms[arm][1], ids, tokens)

    names = [*arms, "generate", *peers]
    checked = [*arms, *peers]  # compared with generate's greedy ids

    # Correctness, as each normally runs: stopping at EOS (the engine leaves EOS out of its ids).
    nat_g = run_generate(hf.model, hf.tokenizer, ids, args.tokens, force=False)
    nat_g_ids = nat_g["ids"][:-1] if nat_g["ids"] and nat_g["ids"][-1] in eos else nat_g["ids"]
    natural = {}
    for arm, (loaded, _) in arms.items():
        r = run_engine(engine_for(loaded, False), ids, args.tokens)
        natural[arm] = verdict(r["ids"], nat_g_ids)
        print(f"greedy ids with EOS stop, {arm} vs generate: {natural[arm]} "
              f"({len(r['ids'])} vs {len(nat_g_ids)} tokens, {r['finish']})")
    for arm, worker in peers.items():  # the peers stop at EOS and include it in their ids
        r_ids = worker.run(ids, args.tokens, force=False)["ids"]
        r_ids = r_ids[:-1] if r_ids and r_ids[-1] in eos else r_ids
        natural[arm] = verdict(r_ids, nat_g_ids)
        print(f"greedy ids with EOS stop, {arm} vs generate: {natural[arm]} ({len(r_ids)} vs {len(nat_g_ids)} tokens)")
    print(f"  answer starts: {hf.tokenizer.decode(nat_g_ids[:24], skip_special_tokens=True)!r}")

    for _ in range(args.warmup):
        for arm in names:
            run(arm, min(args.tokens, 16))
    rounds: dict[str, list[dict]] = {arm: [] for arm in names}
    foreign, repeats = [], 0
    for r in range(args.rounds):
        order = names if args.order == "fixed" or r % 2 == 0 else names[::-1]
        for attempt in range(args.retries + 1):
            if args.wait_idle:
                status = wait_for_idle(args.wait_idle)
                if not status.startswith("idle"):
                    print(f"warning: {status}", flush=True)
            with ForeignCpu(count_iowait=True, pids=[w.pid for w in peers.values()]) as fc:
                results = {arm: run(arm, args.tokens) for arm in order}
            if fc.fraction <= args.max_foreign or attempt == args.retries:
                break
            repeats += 1
            print(f"round {r + 1}: other processes took {fc.fraction:.0%} of the CPUs meanwhile; repeating the round",
                  flush=True)
        for arm in names:
            rounds[arm].append(results[arm])
        foreign.append(fc.fraction)
        print(
            f"round {r + 1} ({' '.join(order)}): "
            + " · ".join(f"{arm} {results[arm]['decode_tps']:6.2f} tok/s" for arm in names)
            + f" · CPU taken by other processes {fc.fraction:.0%}",
            flush=True,
        )

    forced = {arm: verdict(rounds[arm][0]["ids"], rounds["generate"][0]["ids"]) for arm in checked}
    eos_hits = [i for i, t in enumerate(rounds["generate"][0]["ids"]) if t in eos]
    for arm in checked:
        print(f"greedy ids, forced {args.tokens} tokens, {arm} vs generate: {forced[arm]}")
    if eos_hits:
        print(f"  note: generate was kept from EOS by min_new_tokens; the engines ran past EOS at {eos_hits[:3]}")
    stable = all(x["ids"] == rounds[arm][0]["ids"] for arm in names for x in rounds[arm])
    lengths = {arm: sorted({x["tokens"] for x in rounds[arm]}) for arm in names}

    # Rounds during which other processes still took CPUs after --retries repeats are left out of
    # the figures (kept in the JSON); if every round was noisy, all are used and flagged.
    clean = [f <= args.max_foreign for f in foreign]
    if not any(clean):
        print("warning: every round shared the CPUs with other processes: figures are unreliable", flush=True)
        clean = [True] * len(foreign)
    used = {arm: [x for x, ok in zip(v, clean) if ok] for arm, v in rounds.items()}

    result = {
        "dtype": lm.dtype,
        "asked_dtype": dtype,
        "engine_implementation": lm.implementation,
        "engine_quantization": lm.quantization,
        "prompt_tokens": len(ids),
        "new_tokens": args.tokens,
        "token_counts": lengths,
        "torch_threads": torch.get_num_threads(),
        "arms": {},
        "natural_match": natural,
        "forced_match": forced,
        "ids_stable_across_rounds": stable,
        "foreign_cpu_per_round": foreign,
        "rounds_repeated_for_noise": repeats,
        "rounds_used": sum(clean),
        "rounds": {arm: [{k: x[k] for k in ("tokens", "decode_tps", "decode_time", "ttft", "wall", "e2e_tps")} for x in v]
                   for arm, v in rounds.items()},
    }
    gen_tps = [x["decode_tps"] for x in used["generate"]]
    for arm in names:
        tps = [x["decode_tps"] for x in used[arm]]
        paired = [a / b for a, b in zip(tps, gen_tps)]
        result["arms"][arm] = {
            "decode_tps": summary(tps),
            "e2e_tps": summary([x["e2e_tps"] for x in used[arm]]),
            "ttft": summary([x["ttft"] for x in used[arm]]),
            "ratio_vs_generate": statistics.median(tps) / statistics.median(gen_tps),
            "paired_ratios": paired,
        }
    result["ratio"] = result["arms"]["engine"]["ratio_vs_generate"]
    result["engine_decode_tps"] = result["arms"]["engine"]["decode_tps"]["median"]
    result["pass"] = result["ratio"] >= RATIO_GOAL and result["engine_decode_tps"] >= TPS_GOAL
    # vicuna (the default engine arm) / each peer: ratio of medians, and per round (same load).
    eng_tps = [x["decode_tps"] for x in used["engine"]]
    result["peers"] = {arm: w.meta for arm, w in peers.items()}
    result["vicuna_vs_peers"] = {arm: {
        "ratio": result["engine_decode_tps"] / result["arms"][arm]["decode_tps"]["median"],
        "per_round": [a / b for a, b in zip(eng_tps, [x["decode_tps"] for x in used[arm]])],
    } for arm in peers}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Decode tokens/s of vicuna's Engine vs model.generate on the same checkpoint, greedy, batch 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", "-n", type=int, default=5, help="timed interleaved rounds per dtype")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, model dir, .gguf or Hub id (as `vicuna chat -m`)")
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="one or more of auto, bfloat16, float16, float32")
    parser.add_argument("--implementation", default="auto", choices=["auto", "native", "transformers"],
                        help="the model the engine runs (as `vicuna chat --implementation`)")
    parser.add_argument("--quantize", default="auto", choices=["auto", "int8", "none"],
                        help="the engine's weights (as `vicuna chat --quantize`); when they are int8, a --quantize none arm is added")
    parser.add_argument("--no-engine-hf", action="store_true", help="leave out the Engine-over-transformers control arm")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (forced: EOS ignored)")
    parser.add_argument("--prompt", default=PROMPT, help="user message; ask for a long answer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed short runs of each contender first")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for every contender (0: the engine adapts to the free CPUs, core/threads.py)")
    parser.add_argument("--order", choices=["alternate", "fixed"], default="alternate",
                        help="alternate: A B C, C B A, ... (none always runs first); fixed: A B C, A B C, ...")
    parser.add_argument("--max-foreign", type=float, default=0.05,
                        help="repeat a round when other processes took more than this share of the CPUs during it")
    parser.add_argument("--retries", type=int, default=5,
                        help="how often a noisy round may be repeated; still noisy after that: left out of the figures")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each round, wait up to this long for other processes to leave the CPUs idle")
    parser.add_argument("--peers", nargs="*", default=[], metavar="ENGINE[:QUANT]",
                        help="peer arms: llama.cpp (Q4_1), ct2 (float32 and int8), or e.g. ct2:int8; "
                             "needs `python3 benchmarks/peers_decode.py --setup` once")
    parser.add_argument("--json", metavar="PATH", help="JSON output path (None: benchmarks/records/decode-<time>.json)")
    parser.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = parser.parse_args()
    if args.rounds < 1 or args.tokens < 2:
        parser.error("--rounds must be >= 1 and --tokens >= 2")

    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    info = machine_info()
    print("# Decode speed benchmark: Engine vs model.generate\n")
    print_machine(info)
    print(f"model: {args.model} · prompt {args.prompt!r} (chat template) · greedy · batch 1 · rounds {args.rounds}")

    peers: dict[str, PeerWorker] = {}
    try:
        for engine, quant in parse_peers(args.peers):
            worker = PeerWorker(engine, quant, args.threads or 2)
            peers[worker.name] = worker
            print(f"peer {worker.name}: {worker.meta['engine']} {worker.meta['version']}, {quant}, "
                  f"{worker.meta['threads']} threads ({worker.meta['model']})", flush=True)
        results = [bench_dtype(args, dtype, peers) for dtype in args.dtype]
    except PeerError as e:
        sys.exit(f"error: {e}")
    finally:
        for worker in peers.values():
            worker.close()

    print("\nDecode tokens/s (prefill excluded; median of rounds, min-max in brackets):\n")
    rows = []
    for r in results:
        for arm, a in r["arms"].items():
            d = a["decode_tps"]
            label = {"engine": f"Engine ({r['engine_implementation']} model, {r['engine_quantization']} weights)",
                     "engine-none": f"Engine ({r['engine_implementation']} model, --quantize none)",
                     "engine+hf": "Engine (transformers model)",
                     "generate": "model.generate (transformers)"}.get(arm) or peer_label(r["peers"][arm])
            paired = a["paired_ratios"]
            rows.append([
                r["dtype"],
                label,
                f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]",
                f"{1000 / d['median']:.1f}",
                "-" if arm == "generate" else
                f"{a['ratio_vs_generate']:.2f} (per round {statistics.median(paired):.2f}, {min(paired):.2f}-{max(paired):.2f})",
                "-" if arm == "generate" else r["natural_match"][arm],
                "-" if arm == "generate" else r["forced_match"][arm],
            ])
    print(markdown_table(
        ["dtype", "contender", "tok/s", "ms/token", "ratio vs generate", "greedy ids vs generate (EOS stop)",
         "greedy ids vs generate (forced)"],
        rows,
    ))
    print()
    for r in results:
        print(f"{r['dtype']}: engine / generate = {r['ratio']:.2f}, engine {r['engine_decode_tps']:.1f} tok/s "
              f"-> goals >= {RATIO_GOAL:.1f}x and >= {TPS_GOAL:.0f} tok/s: "
              f"{'PASS' if r['pass'] else 'FAIL'}")
        for arm, v in r["vicuna_vs_peers"].items():
            goal = f" -> goal >= {PEER_GOAL}x: {'PASS' if v['ratio'] >= PEER_GOAL else 'FAIL'}" if arm == "llama.cpp" else ""
            print(f"{r['dtype']}: vicuna / {arm} = {v['ratio']:.2f} (per round "
                  f"{', '.join(f'{x:.2f}' for x in v['per_round'])}){goal}")
    print("\nEnd to end (prompt in, all tokens out): median tok/s, and time to first token (s):\n")
    print(markdown_table(
        ["dtype", *[f"{arm} tok/s" for arm in results[0]["arms"]], *[f"{arm} first token" for arm in results[0]["arms"]]],
        [[r["dtype"], *[f"{a['e2e_tps']['median']:.1f}" for a in r["arms"].values()],
          *[f"{a['ttft']['median']:.3f}" for a in r["arms"].values()]] for r in results],
    ))
    print()
    for r in results:
        print(f"{r['dtype']}: CPU taken by other processes per round {', '.join(f'{x:.0%}' for x in r['foreign_cpu_per_round'])}"
              f" ({r['rounds_repeated_for_noise']} round(s) repeated for noise; {r['rounds_used']} of "
              f"{len(r['foreign_cpu_per_round'])} rounds used); tokens per run {r['token_counts']}")
    print(f"load average at end: {loadavg()}")

    if not args.no_json:
        data = {
            "benchmark": "decode",
            "machine": {**info, "loadavg_at_end": loadavg()},
            "settings": vars(args),
            "goal_ratio": RATIO_GOAL,
            "goal_tps": TPS_GOAL,
            "results": results,
        }
        print(f"results: {write_results('decode', data, args.json)}")


if __name__ == "__main__":
    main()
