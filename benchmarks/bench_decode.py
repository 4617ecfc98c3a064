#!/usr/bin/env python
"""Decode speed: vicuna's streaming Engine vs a plain `model.generate` on the same loaded model.

Same model object (loaded once with `vicuna_cli.core.models.load`, so the dtype is the one vicuna
picks: bf16 on CPUs with native bf16, else fp32; `--dtype float32` etc. to choose), same prompt
(a chat-templated request for a long answer, rendered with `tokenizer.apply_chat_template`),
greedy, batch 1, exactly --tokens new tokens on both sides:

  A  Engine(model, tokenizer, context).generate(prompt_ids, SamplingParams(temperature=0, ...)),
     consumed as a stream of text deltas (detokenizing is part of what it does), with its
     `stop_token_ids` emptied so that it does not stop at EOS;
  B  model.generate(..., do_sample=False, min_new_tokens=N, max_new_tokens=N) with a streamer
     that only timestamps each token.

Decode speed = (N - 1) tokens / time from the first new token to the last, i.e. prefill excluded,
the same definition as the engine's own `stats.tokens_per_second`. End-to-end (prompt in, N tokens
out) is reported too. A and B alternate (A B A B ...) for --rounds rounds after one warm-up each.

Correctness: in greedy mode the engine's token ids must equal model.generate's. Checked twice:
with both stopping at EOS as they normally do (max N tokens), and on the forced-length runs.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_decode.py --rounds 5 --dtype auto float32

Goal: engine / generate decode speed ratio >= 1.0.
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
    loadavg,
    machine_info,
    markdown_table,
    print_machine,
    summary,
    write_results,
)

PROMPT = "Write a long story about a dragon."
RATIO_GOAL = 1.0


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
    wall = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    t = streamer.times
    n = len(t)
    decode_time = t[-1] - t[0] if n >= 2 else 0.0
    return {
        "ids": new,
        "tokens": n,
        "decode_tps": (n - 1) / decode_time if n >= 2 else 0.0,
        "decode_time": decode_time,
        "ttft": t[0] - start if t else None,
        "wall": wall,
        "e2e_tps": n / wall,
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bench_dtype(args, dtype: str, info: dict) -> dict:
    import torch

    from vicuna_cli.core import models
    from vicuna_cli.core.generate import Engine

    lm = models.load(args.model, device="cpu", dtype=dtype, progress=False)
    model, tok = lm.model, lm.tokenizer
    ids = prompt_ids(tok, args.prompt)
    engine = Engine(model, tok, lm.context_length)  # as vicuna uses it: stops at EOS
    forced = Engine(model, tok, lm.context_length)
    forced.stop_token_ids = set()  # generate exactly --tokens tokens
    eos = set(engine.stop_token_ids)
    print(
        f"\n## dtype {lm.dtype} (asked: {dtype}) · {lm.attention} attention · torch threads {torch.get_num_threads()} "
        f"· prompt {len(ids)} tokens · {args.tokens} new tokens",
        flush=True,
    )

    # Correctness, as each normally runs: both stop at EOS (the engine leaves EOS out of its ids).
    nat_e = run_engine(engine, ids, args.tokens)
    nat_g = run_generate(model, tok, ids, args.tokens, force=False)
    nat_g_ids = [t for t in nat_g["ids"] if t not in eos] if nat_g["ids"] and nat_g["ids"][-1] in eos else nat_g["ids"]
    natural_match = nat_e["ids"] == nat_g_ids
    print(
        f"greedy ids, natural stop: engine {len(nat_e['ids'])} tokens ({nat_e['finish']}), generate "
        f"{len(nat_g['ids'])} tokens -> {'MATCH' if natural_match else 'DIFFER at token ' + str(first_difference(nat_e['ids'], nat_g_ids))}"
    )
    print(f"  answer starts: {tok.decode(nat_e['ids'][:24], skip_special_tokens=True)!r}")

    # Warm-up, then interleaved timed rounds of forced-length runs.
    for _ in range(args.warmup):
        run_engine(forced, ids, min(args.tokens, 16))
        run_generate(model, tok, ids, min(args.tokens, 16), force=True)
    rounds = {"engine": [], "generate": []}
    for r in range(args.rounds):
        a = run_engine(forced, ids, args.tokens)
        b = run_generate(model, tok, ids, args.tokens, force=True)
        rounds["engine"].append(a)
        rounds["generate"].append(b)
        print(
            f"round {r + 1}: engine {a['decode_tps']:6.2f} tok/s ({a['tokens']} tok) · generate {b['decode_tps']:6.2f} tok/s "
            f"({b['tokens']} tok) · load {loadavg()}",
            flush=True,
        )
    e_ids, g_ids = rounds["engine"][0]["ids"], rounds["generate"][0]["ids"]
    forced_match = e_ids == g_ids
    eos_in_forced = [i for i, t in enumerate(e_ids) if t in eos]
    print(
        f"greedy ids, forced {args.tokens} tokens: {'MATCH' if forced_match else 'DIFFER at token ' + str(first_difference(e_ids, g_ids))}"
        + (f" (the engine's argmax hit EOS at {eos_in_forced[:3]}, where min_new_tokens masks it)" if eos_in_forced else "")
    )
    stable = all(r["ids"] == e_ids for r in rounds["engine"]) and all(r["ids"] == g_ids for r in rounds["generate"])

    def s(name: str, key: str) -> dict:
        return summary([r[key] for r in rounds[name]])

    result = {
        "dtype": lm.dtype,
        "asked_dtype": dtype,
        "prompt_tokens": len(ids),
        "new_tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "engine": {"decode_tps": s("engine", "decode_tps"), "e2e_tps": s("engine", "e2e_tps"), "ttft": s("engine", "ttft")},
        "generate": {"decode_tps": s("generate", "decode_tps"), "e2e_tps": s("generate", "e2e_tps"), "ttft": s("generate", "ttft")},
        "paired_ratio_median": statistics.median(
            a["decode_tps"] / b["decode_tps"] for a, b in zip(rounds["engine"], rounds["generate"])
        ),
        "natural_match": natural_match,
        "natural_tokens": {"engine": len(nat_e["ids"]), "generate": len(nat_g["ids"])},
        "forced_match": forced_match,
        "ids_stable_across_rounds": stable,
        "rounds": {k: [{x: r[x] for x in ("tokens", "decode_tps", "decode_time", "ttft", "wall", "e2e_tps")} for r in v]
                   for k, v in rounds.items()},
    }
    result["ratio"] = result["engine"]["decode_tps"]["median"] / result["generate"]["decode_tps"]["median"]
    result["pass"] = result["ratio"] >= RATIO_GOAL
    del lm, model, engine, forced
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Decode tokens/s of vicuna's Engine vs model.generate on the same model, greedy, batch 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", "-n", type=int, default=5, help="timed A/B rounds per dtype")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, model dir, .gguf or Hub id (as `vicuna chat -m`)")
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="one or more of auto, bfloat16, float16, float32")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (forced: EOS ignored)")
    parser.add_argument("--prompt", default=PROMPT, help="user message; ask for a long answer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed short runs of each first")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="write results here (default: benchmarks/results/decode-<time>.json)")
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

    results = [bench_dtype(args, dtype, info) for dtype in args.dtype]

    print("\nDecode tokens/s (prefill excluded; median of rounds, min-max in brackets):\n")
    rows = []
    for r in results:
        e, g = r["engine"]["decode_tps"], r["generate"]["decode_tps"]
        rows.append([
            r["dtype"],
            r["new_tokens"],
            f"{e['median']:.1f} [{e['min']:.1f}-{e['max']:.1f}]",
            f"{g['median']:.1f} [{g['min']:.1f}-{g['max']:.1f}]",
            f"{1000 / e['median']:.1f} / {1000 / g['median']:.1f}",
            f"{r['ratio']:.2f} (paired {r['paired_ratio_median']:.2f})",
            "PASS" if r["pass"] else "FAIL",
            "yes" if r["natural_match"] else "NO",
            "yes" if r["forced_match"] else "NO",
        ])
    print(markdown_table(
        ["dtype", "tokens", "engine tok/s", "generate tok/s", "ms/token engine / generate",
         "ratio engine/generate", f"goal >= {RATIO_GOAL:.1f}", "ids match (EOS stop)", f"ids match (forced)"],
        rows,
    ))
    print("\nEnd to end (prompt in, all tokens out), median tok/s and time to first token:\n")
    print(markdown_table(
        ["dtype", "engine tok/s", "generate tok/s", "engine first token (s)", "generate first token (s)"],
        [[r["dtype"], f"{r['engine']['e2e_tps']['median']:.1f}", f"{r['generate']['e2e_tps']['median']:.1f}",
          f"{r['engine']['ttft']['median']:.3f}", f"{r['generate']['ttft']['median']:.3f}"] for r in results],
    ))
    print(f"\nload average at end: {loadavg()}")

    if not args.no_json:
        data = {
            "benchmark": "decode",
            "machine": {**info, "loadavg_at_end": loadavg()},
            "settings": vars(args),
            "goal_ratio": RATIO_GOAL,
            "results": results,
        }
        print(f"results: {write_results('decode', data, args.json)}")


if __name__ == "__main__":
    main()
