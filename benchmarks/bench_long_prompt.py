#!/usr/bin/env python
"""A short request behind a long prompt (issue 18 item 8): its TTFT vs on an idle server, the
running streams' inter-token gaps while the long prompt is prefilled, and the worker's memory.

`vicuna serve` with the embedded model is started on free loopback ports. Each round runs two
conditions, in alternating order (the shared VM's speed drifts by 10-20 % over minutes, so both
conditions get the same share of it):
  idle    one short request (2 output tokens) on the otherwise idle server: its TTFT;
  behind  a stream S already decoding; a ~8,000-token prompt L is sent, then --delay s later the
          same kind of short request: its TTFT, S's gaps before L and while L is prefilled (until
          L's first token), L's own TTFT.
Every round's L starts with its own line, so the prefix cache cannot serve it from an earlier
round. The worker's peak RSS is taken per condition and round (the kernel's high-water mark,
reset before each), and its RSS when the round is over (memory given back after the burst?).

    VICUNA_HOME=/tmp/vh python benchmarks/bench_long_prompt.py --rounds 3

Goal: p50 TTFT behind the long prompt within 2x the p50 TTFT on the idle server.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, loadavg, machine_info, markdown_table, print_machine, write_results  # noqa: E402
from bench_serve import HH_RLHF, Result, VicunaServer, _stream_chat, stream_chat  # noqa: E402

GOAL_RATIO = 2.0
SHORT_PROMPT = "What is the capital of France?"
STREAM_PROMPT = "Write a long story about a lighthouse keeper."


def long_text(tokenizer: Any, tokens: int, round_index: int) -> str:
    """About `tokens` tokens of HH-RLHF dialogue, opened by a line of its own for this round."""
    parts, count = [f"Round {round_index}: summarise the conversations below in one sentence."], 0
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            parts.append(text)
            count += len(tokenizer.encode(text, add_special_tokens=False))
            if count >= tokens:
                break
    ids = tokenizer.encode("\n".join(parts), add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


def piece_times(res: Result) -> list[float]:
    """When each content piece arrived (perf_counter), from TTFT and the gaps."""
    if res._last is None:
        return []
    times = [res.start + res.ttft]
    for gap in res.itl:
        times.append(times[-1] + gap)
    return times


async def wait_pieces(res: Result, count: int, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while len(res._parts) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)


async def run_condition(url: str, body: Any, long_prompt: str | None, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout)) as client:
        if long_prompt is None:
            short = await stream_chat(client, url, body(SHORT_PROMPT, 2), args.request_timeout)
            return {"short_ok": short.ok, "short_ttft_s": short.ttft, "error": short.error}
        stream = Result(ok=False)
        stream_task = asyncio.create_task(_stream_chat(client, url, body(STREAM_PROMPT, args.stream_tokens), stream))
        await wait_pieces(stream, 5, args.request_timeout)
        long_sent = time.perf_counter()
        long_task = asyncio.create_task(stream_chat(client, url, body(long_prompt, 4), args.request_timeout))
        await asyncio.sleep(args.delay)
        short = await stream_chat(client, url, body(SHORT_PROMPT, 2), args.request_timeout)
        long = await long_task
        await asyncio.wait_for(stream_task, args.request_timeout)
    long_first = long_sent + long.ttft
    times = piece_times(stream)
    gaps = list(zip(times, times[1:]))
    before = [b - a for a, b in gaps if b <= long_sent]
    during = [b - a for a, b in gaps if a >= long_sent and b <= long_first]
    return {
        "short_ok": short.ok, "short_ttft_s": short.ttft, "long_ok": long.ok, "long_ttft_s": long.ttft,
        "long_prompt_tokens": long.prompt_tokens, "stream_ok": stream.ok,
        "stream_gap_before_p50_s": statistics.median(before) if before else None,
        "stream_gaps_during_long": len(during),
        "stream_gap_during_p50_s": statistics.median(during) if during else None,
        "stream_gap_during_max_s": max(during) if during else None,
        "error": "; ".join(e for e in (short.error, long.error, stream.error) if e),
    }


def median_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-tokens", type=int, default=8000, help="length of the long prompt's text")
    parser.add_argument("--delay", type=float, default=3.0, help="s between the long prompt and the short request")
    parser.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of the running stream S")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--request-timeout", type=float, default=400.0, help="bound on one request (s)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--vicuna-arg", action="append", default=[], help="extra flag for `vicuna serve` (repeatable)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp") / "bench-long-prompt")
    parser.add_argument("--json", default=None, help="write results here (default benchmarks/records/)")
    args = parser.parse_args()

    info = machine_info()
    print_machine(info)
    from transformers import AutoTokenizer

    from vicuna_cli.core import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model).path)
    server = VicunaServer(args.model, args.log_dir, args.vicuna_arg, args.start_timeout, {})
    rounds: list[dict[str, Any]] = []
    try:
        target = server.start()
        memory = server.worker_memory()
        url = f"{target.base_url}/v1/chat/completions"
        asyncio.run(run_condition(url, target.body, None, args))  # warm-up
        for i in range(args.rounds):
            prompt = long_text(tokenizer, args.long_tokens, i)
            for condition in ("idle", "behind") if i % 2 == 0 else ("behind", "idle"):
                load = loadavg()
                memory.reset()
                row = asyncio.run(run_condition(url, target.body, prompt if condition == "behind" else None, args))
                time.sleep(1.0)  # the long request's slot is released after its last event
                row.update(round=i, condition=condition, load=load, **{f"worker_{k}": v for k, v in memory.read().items()})
                rounds.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.stop()

    idle = [r for r in rounds if r["condition"] == "idle"]
    behind = [r for r in rounds if r["condition"] == "behind"]
    ratio = median_of(behind, "short_ttft_s") / median_of(idle, "short_ttft_s")
    header = ["condition", "rounds ok", "short TTFT p50 ms", "long TTFT p50 s", "stream gap before / during p50 ms",
              "stream gap during max ms", "worker peak RSS MB (max)", "worker RSS after MB (max)", "load"]
    table = []
    for name, rows in (("idle", idle), ("behind long prompt", behind)):
        def ms(key: str, rows: list[dict] = rows) -> str:
            value = median_of(rows, key)
            return "—" if value != value else f"{value * 1000:,.0f}"

        long_ttft = median_of(rows, "long_ttft_s")
        table.append([
            name, f"{sum(r['short_ok'] for r in rows)}/{len(rows)}", ms("short_ttft_s"),
            "—" if long_ttft != long_ttft else f"{long_ttft:.1f}",
            f"{ms('stream_gap_before_p50_s')} / {ms('stream_gap_during_p50_s')}", ms("stream_gap_during_max_s"),
            f"{max(r['worker_peak_rss_mb'] or 0 for r in rows):,.0f}", f"{max(r['worker_rss_mb'] or 0 for r in rows):,.0f}",
            " / ".join(r["load"].split()[0] for r in rows),
        ])
    print()
    print(markdown_table(header, table))
    verdict = "pass" if ratio <= GOAL_RATIO else "fail"
    print(f"\nshort-request TTFT behind / idle: {ratio:.2f}x (goal <= {GOAL_RATIO:.0f}x): {verdict}")
    path = write_results("long-prompt", {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rounds": rounds, "ttft_ratio": ratio, "goal": GOAL_RATIO, "verdict": verdict},
                         args.json)
    print(f"load average at end: {loadavg()}; results: {path}")


if __name__ == "__main__":
    main()
