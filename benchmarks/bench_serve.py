#!/usr/bin/env python
"""Serving load benchmark: `vicuna serve` vs FastChat vs the engine called directly, side by side.

Measures what vLLM's `benchmark_serving.py` (`vllm bench serve`) measures, with the same field
names: request throughput, output tokens/s, TTFT, TPOT, ITL and end-to-end latency (mean, median,
p99, in ms), at several concurrency levels (default 1, 4, 16, 32). At each level every request is
sent at once behind a semaphore of that size (vLLM's `--request-rate inf --max-concurrency C`),
`--waves` x C requests per level, with a bound on each request and on each level.

Targets (each an OpenAI-compatible server, streaming chat completions):
  vicuna    `vicuna serve -m MODEL --template vicuna_v1.1` (single-machine mode: controller, one
            worker, API), started here on free loopback ports, or `--vicuna-url` for a running one;
  fastchat  FastChat's controller + model_worker + openai_api_server (benchmarks/fastchat_serve.py,
            venv from ../shared/peers/fastchat/setup.sh), or `--fastchat-url`;
  direct    the generation engine in this process, no HTTP (core.generate.Engine over the model
            `core.models.load` gives, as `vicuna chat` runs it), concurrency 1 only: the baseline
            for "at most 10 % throughput lost to serving".

Same prompts for every target at a level: the first human turn of conversations from Anthropic's
HH-RLHF (../shared/data/hh-rlhf, MIT), or a ShareGPT-format JSON (`--prompts FILE`; e.g. made by
benchmarks/make_sharegpt_corpus.py), sampled with a fixed seed. Both servers render them with the
same template, vicuna_v1.1 (FastChat's `--conv-template vicuna_v1.1`, vicuna's `--template`): the
two implementations produce byte-identical prompts (checked at start when the FastChat venv is
there), so prompt lengths match. The model's own ChatML template would be the better choice for
answer quality, but FastChat has no template that reproduces SmolLM2's; for throughput, identical
prompts matter more. Greedy decoding (temperature 0), `max_tokens` fixed, the same `stop` list
sent to both. Neither server has an ignore_eos option, so outputs can end early at EOS; output
tokens are counted from the server's `usage` when it streams one (vicuna), else by re-tokenising
the streamed text with the model's tokenizer (FastChat streams no usage).

For vicuna started here, the worker's peak RSS during each level is reported (the kernel's
high-water mark, reset at the start of the level). Levels run one after another; within a level the targets alternate (the order flips every level),
except at concurrency 1, where they take turns request by request (see run_level).
The machine is shared: for every (level, target) the script records the load average and the share
of CPU time that processes other than this script and the target's process tree took
(`foreign`), and prints a warning when it is over --max-foreign.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_serve.py --fastchat-venv /tmp/fastchat-venv

Goals (embedded model): vicuna >= 4x FastChat's output tokens/s at concurrency 16; vicuna's median
TTFT below FastChat's at every level; vicuna at concurrency 1 within 10 % of the direct engine's
output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_MODEL, PeakRss, _cpu_times, descendants, find_process, loadavg, machine_info,  # noqa: E402
                     markdown_table, print_machine, proc_stats, write_results)
from fastchat_serve import FastChatStack, free_port, get_json, stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TEMPLATE = "vicuna_v1.1"
# The template's own stop strings, sent explicitly so both servers stop on the same ones
# (FastChat's vicuna_v1.1 has no stop_str; vicuna's adds these itself).
STOP = ["</s>", "USER:"]
GOAL_RATIO_C16 = 4.0
GOAL_DIRECT_LOSS = 0.10


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: Path | None, count: int, seed: int, tokenizer: Any, max_prompt_tokens: int) -> list[str]:
    """`count` first user turns, sampled with `seed`, each at most `max_prompt_tokens` long."""
    texts: list[str] = []
    if path is None or path.name.endswith((".jsonl", ".jsonl.gz")):
        source = path or HH_RLHF
        opener = gzip.open if source.name.endswith(".gz") else open
        with opener(source, "rt", encoding="utf-8") as f:
            for line in f:
                dialogue = json.loads(line)["chosen"]
                first = dialogue.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
                texts.append(first)
    else:  # ShareGPT: [{"conversations": [{"from": "human"|"gpt", "value"}]}]
        for record in json.loads(path.read_text(encoding="utf-8")):
            turns = record.get("conversations") or []
            first = next((t["value"] for t in turns if t.get("from") == "human"), "").strip()
            texts.append(first)
    unique = sorted({t for t in texts if t and len(tokenizer.encode(t, add_special_tokens=False)) <= max_prompt_tokens})
    if len(unique) < count:
        raise SystemExit(f"only {len(unique)} usable prompts in {path or HH_RLHF}, need {count}")
    return random.Random(seed).sample(unique, count)


# ---------------------------------------------------------------------------------------------
# Measuring one request


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0                     # s, request sent -> first content
    latency: float = 0.0                  # s, request sent -> last byte
    itl: list[float] = field(default_factory=list)  # s, gaps between content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    counted_by: str = ""                  # "usage" or "retokenized"
    error: str = ""
    text: str = ""
    start: float = field(default_factory=time.perf_counter)
    _last: float | None = None
    _parts: list[str] = field(default_factory=list)

    def piece(self, text: str) -> None:
        """A piece of answer text arrived now: the first sets TTFT, the next ones add ITL gaps."""
        now = time.perf_counter()
        if self._last is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self._last)
        self._last = now
        self._parts.append(text)

    def finish(self) -> None:
        self.latency = time.perf_counter() - self.start
        if self._last is None:  # no text at all (EOS first): the first token came with the end
            self.ttft = self.latency
        self.text = "".join(self._parts)


async def stream_chat(client: Any, url: str, body: dict, timeout: float) -> Result:
    res = Result(ok=False)
    try:
        return await asyncio.wait_for(_stream_chat(client, url, body, res), timeout)
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout:.0f} s"
        return res
    except Exception as exc:  # a benchmark counts failures instead of stopping
        res.error = f"{type(exc).__name__}: {exc}"
        return res


async def _stream_chat(client: Any, url: str, body: dict, res: Result) -> Result:
    usage = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            res.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            return res
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = f"stream error: {chunk['error']}"
                return res
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    res.piece(delta)
        if not done:
            res.error = "stream ended without [DONE]"
            return res
    res.finish()
    if usage:
        res.output_tokens, res.prompt_tokens, res.counted_by = usage["completion_tokens"], usage["prompt_tokens"], "usage"
    res.ok = True
    return res


# ---------------------------------------------------------------------------------------------
# Targets


class ProcessTreeCpu:
    """CPU seconds used so far by some processes and all their descendants (from /proc)."""

    def __init__(self, roots: list[int]):
        self.roots = roots

    def seconds(self) -> float:
        stats = proc_stats()
        tree = descendants(self.roots, stats)
        return sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


class Load:
    """Load average and the CPU share taken by processes other than us and `target_pids`' trees."""

    def __init__(self, target_pids: list[int]):
        self.tree = ProcessTreeCpu(target_pids)

    def __enter__(self) -> "Load":
        self.load_before = loadavg()
        self.t0, self.busy0, self.tree0 = os.times(), _cpu_times(True)[0], self.tree.seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = os.times()
        busy = (_cpu_times(True)[0] - self.busy0) / os.sysconf("SC_CLK_TCK")
        own = (t1.user + t1.system) - (self.t0.user + self.t0.system)
        wall = max(t1.elapsed - self.t0.elapsed, 1e-6)
        self.foreign = max(0.0, (busy - own - (self.tree.seconds() - self.tree0)) / (wall * (os.cpu_count() or 1)))
        self.load_after = loadavg()


class HttpTarget:
    def __init__(self, name: str, base_url: str, model: str, pids: list[int]):
        self.name, self.base_url, self.model, self.pids = name, base_url.rstrip("/"), model, pids

    def body(self, prompt: str, max_tokens: int) -> dict:
        return {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0, "stop": STOP,
        }

    async def run(self, prompts: list[str], concurrency: int, args: argparse.Namespace) -> tuple[list[Result], float]:
        bodies = [self.body(p, args.max_tokens) for p in prompts]
        return await run_requests(f"{self.base_url}/v1/chat/completions", bodies, concurrency, args.request_timeout, args.level_timeout)


async def run_requests(url: str, bodies: list[dict], concurrency: int, request_timeout: float,
                       level_timeout: float) -> tuple[list[Result], float]:
    """Stream every body to `url`, at most `concurrency` at once; (results in order, wall time).
    Also the raw load client of bench_judge.py, which replays a judge run's requests."""
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), limits=limits) as client:

        async def one(body: dict) -> Result:
            async with semaphore:
                return await stream_chat(client, url, body, request_timeout)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(b)) for b in bodies]
        done, pending = await asyncio.wait(tasks, timeout=level_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    results = [t.result() if t in done else Result(ok=False, error=f"level bound {level_timeout:.0f} s hit")
               for t in tasks]
    return results, duration


class DirectTarget:
    """The engine in-process, one request after another (what a server at concurrency 1 wraps)."""

    name = "direct"
    pids: list[int] = []

    def __init__(self, model: str, dtype: str):
        from vicuna_cli.core import models
        from vicuna_cli.core.generate import Engine
        from vicuna_cli.core.templates import get_template

        self.loaded = models.load(model, dtype=dtype)
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer, self.loaded.context_length)
        self.template = get_template(TEMPLATE, self.loaded.tokenizer)

    async def run(self, prompts: list[str], concurrency: int, args: argparse.Namespace) -> tuple[list[Result], float]:
        from vicuna_cli.core.generate import SamplingParams

        results = []
        start_all = time.perf_counter()
        for prompt in prompts:
            res = Result(ok=True, counted_by="engine")  # the clock starts before rendering, as a server's does
            text = self.template.render([{"role": "user", "content": prompt}]).text
            ids = self.engine.encode(text)
            params = SamplingParams(temperature=0.0, max_new_tokens=args.max_tokens, stop=list(STOP))
            gen = self.engine.generate(ids, params)
            for delta in gen:
                res.piece(delta)
            res.finish()
            res.prompt_tokens, res.output_tokens = len(ids), len(gen.output_ids)
            results.append(res)
        return results, time.perf_counter() - start_all


class VicunaServer:
    """`vicuna serve` in single-machine mode on free loopback ports, as one process group."""

    def __init__(self, model: str, dtype: str, log_dir: Path, extra: list[str], start_timeout: float,
                 env: dict[str, str]):
        self.port = free_port()
        self.dtype = dtype
        self.model, self.log_dir, self.extra, self.start_timeout = model, log_dir, extra, start_timeout
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> HttpTarget:
        from fastchat_serve import wait_for_model

        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).with_name("vicuna")), "serve", "-m", self.model, "--template", TEMPLATE,
            "--port", str(self.port), "--controller-port", str(free_port()), "--worker-port", str(free_port()),
            "--dtype", self.dtype, *self.extra,
        ]
        with open(self.log_dir / "vicuna-serve.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        print("started:", " ".join(cmd), flush=True)
        try:
            wait_for_model(f"http://127.0.0.1:{self.port}", self.model, [self.proc], self.start_timeout, self.log_dir)
        except BaseException:
            self.stop()
            raise
        return HttpTarget("vicuna", f"http://127.0.0.1:{self.port}", self.model, [self.proc.pid])

    def worker_memory(self) -> PeakRss:
        """The (first) worker process's memory: it holds the model and the KV cache."""
        return PeakRss(find_process(self.proc.pid, "serve", "worker") if self.proc else None)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30.0)


# ---------------------------------------------------------------------------------------------
# Metrics (vLLM's BenchmarkMetrics, in ms)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def dist(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": pct(ms, 99)}


def metrics(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out,
        "mean_output_tokens": out / len(ok) if ok else 0.0,
        "request_throughput": len(ok) / duration,
        "output_throughput": out / duration,
        "ttft_ms": dist([r.ttft for r in ok]),
        "tpot_ms": dist(tpot),
        "itl_ms": dist([gap for r in ok for gap in r.itl]),
        "e2el_ms": dist([r.latency for r in ok]),
        "counted_by": sorted({r.counted_by for r in ok}),
    }


# ---------------------------------------------------------------------------------------------


def count_tokens(results: list[Result], tokenizer: Any, prompts: list[str], template: Any) -> None:
    """Fill in token counts for servers that streamed no usage: re-tokenise with the model's tokenizer."""
    for res, prompt in zip(results, prompts):
        if res.ok and not res.counted_by:
            res.output_tokens = len(tokenizer.encode(res.text, add_special_tokens=False))
            res.prompt_tokens = len(tokenizer.encode(template.render([{"role": "user", "content": prompt}]).text))
            res.counted_by = "retokenized"


def check_same_prompt(venv: Path, template: Any) -> str:
    """Render one conversation with FastChat's vicuna_v1.1 and ours: they must be identical."""
    sample = "How do I boil an egg?\nBe brief."
    code = (
        "import json,sys; from fastchat.conversation import get_conv_template as g; c=g(sys.argv[1]); "
        "c.append_message(c.roles[0], sys.argv[2]); c.append_message(c.roles[1], None); print(json.dumps(c.get_prompt()))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, TEMPLATE, sample], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        return f"not checked ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})"
    theirs = json.loads(out.stdout)
    ours = template.render([{"role": "user", "content": sample}]).text
    if theirs != ours:
        raise SystemExit(f"FastChat's {TEMPLATE} prompt differs from vicuna's:\n{theirs!r}\n{ours!r}")
    return "identical"


def fmt(x: float, digits: int = 0) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def print_level(concurrency: int, rows: dict[str, dict]) -> None:
    header = ["target", "ok/failed", "s", "req/s", "out tok/s", "out tok/req", "TTFT mean/p50/p99 ms",
              "TPOT mean/p50/p99 ms", "ITL mean/p50/p99 ms", "E2EL p50/p99 ms", "worker peak RSS MB", "foreign CPU", "load"]
    table = []
    for name, m in rows.items():
        t, tp, itl, e = m["ttft_ms"], m["tpot_ms"], m["itl_ms"], m["e2el_ms"]
        table.append([
            name, f"{m['completed']}/{m['failed']}", fmt(m["duration_s"], 1), fmt(m["request_throughput"], 3),
            fmt(m["output_throughput"], 1), fmt(m["mean_output_tokens"], 1),
            f"{fmt(t['mean'])} / {fmt(t['median'])} / {fmt(t['p99'])}",
            f"{fmt(tp['mean'], 1)} / {fmt(tp['median'], 1)} / {fmt(tp['p99'], 1)}",
            f"{fmt(itl['mean'], 1)} / {fmt(itl['median'], 1)} / {fmt(itl['p99'], 1)}",
            f"{fmt(e['median'])} / {fmt(e['p99'])}", fmt(m.get("worker_peak_rss_mb") or float("nan")),
            f"{m['foreign']:.0%}", m["load_before"].split()[0],
        ])
    print(f"\n### concurrency {concurrency}\n")
    print(markdown_table(header, table), flush=True)
    for name, m in rows.items():
        if m["errors"]:
            print(f"  {name} errors: {m['errors']}")


def verdicts(levels: dict[int, dict[str, dict]]) -> list[list[str]]:
    rows = []
    for c, r in levels.items():
        if "vicuna" in r and "fastchat" in r:
            v, f = r["vicuna"], r["fastchat"]
            ratio = v["output_throughput"] / f["output_throughput"] if f["output_throughput"] else float("inf")
            goal = f"≥ {GOAL_RATIO_C16:.0f}× at c=16" if c == 16 else ""
            rows.append([f"c={c}", "vicuna / FastChat output tok/s", f"{ratio:.2f}×", goal,
                         ("**pass**" if ratio >= GOAL_RATIO_C16 else "**fail**") if c == 16 else ""])
            vt, ft = v["ttft_ms"]["median"], f["ttft_ms"]["median"]
            rows.append([f"c={c}", "p50 TTFT vicuna vs FastChat", f"{vt:,.0f} vs {ft:,.0f} ms ({vt / ft:.2f}×)",
                         "lower", "**pass**" if vt < ft else "**fail**"])
        if "vicuna" in r and "direct" in r:
            v, d = r["vicuna"], r["direct"]
            loss = 1 - v["output_throughput"] / d["output_throughput"]
            rows.append([f"c={c}", "vicuna vs direct engine output tok/s",
                         f"{v['output_throughput']:.1f} vs {d['output_throughput']:.1f} (loss {loss:.1%})",
                         f"loss ≤ {GOAL_DIRECT_LOSS:.0%}", "**pass**" if loss <= GOAL_DIRECT_LOSS else "**fail**"])
    return rows


def run_level(targets: dict[str, Any], concurrency: int, prompts: list[str], args: argparse.Namespace) -> dict[str, tuple]:
    """Each target's (results, duration, foreign CPU share, load before, load after) for one level.

    Above concurrency 1 the targets run one after another. At concurrency 1 they take turns
    request by request (the order flipping every request), so that the VM's drift, which moves
    the per-token time by 10-20 % over minutes here, falls on every target alike: the server vs
    direct-engine comparison at c=1 is a difference of a few percent. Requests at c=1 run one at
    a time anyway, so a target's duration is the sum of its requests' wall times."""
    names = list(targets)
    # A turn: all the level's requests at once, or (c=1) one request.
    turns = [[p] for p in prompts] if concurrency == 1 else [prompts]
    results: dict[str, list] = {n: [] for n in names}
    duration = dict.fromkeys(names, 0.0)
    foreign_s = dict.fromkeys(names, 0.0)
    load_before: dict[str, str] = {}
    load_after: dict[str, str] = {}
    for i, turn in enumerate(turns):
        for name in names if i % 2 == 0 else names[::-1]:
            with Load(targets[name].pids) as load:
                got, seconds = asyncio.run(targets[name].run(turn, concurrency, args))
            results[name] += got
            duration[name] += seconds
            foreign_s[name] += load.foreign * seconds
            load_before.setdefault(name, load.load_before)
            load_after[name] = load.load_after
    return {n: (results[n], duration[n], foreign_s[n] / max(duration[n], 1e-9), load_before[n], load_after[n]) for n in names}


async def warm_up(target: Any, prompt: str, args: argparse.Namespace) -> None:
    warm = argparse.Namespace(**{**vars(args), "max_tokens": 8})
    results, _ = await target.run([prompt], 1, warm)
    if not results[0].ok:
        raise SystemExit(f"{target.name}: the warm-up request failed: {results[0].error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--targets", nargs="+", default=["vicuna", "fastchat", "direct"],
                        choices=["vicuna", "fastchat", "direct"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=Path, default=None, help="HH-RLHF .jsonl(.gz) or ShareGPT .json (default: HH-RLHF)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="bound on one request (s)")
    parser.add_argument("--level-timeout", type=float, default=900.0, help="bound on one (level, target) (s)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="bound on a server's start-up (s)")
    parser.add_argument("--vicuna-url", help="use this running vicuna server instead of starting one")
    parser.add_argument("--vicuna-arg", action="append", default=[], help="extra flag for `vicuna serve` (repeatable)")
    parser.add_argument("--fastchat-url", help="use this running FastChat API server instead of starting one")
    parser.add_argument("--fastchat-venv", type=Path, default=ROOT / ".peers" / "fastchat-venv")
    parser.add_argument("--dtype", default="auto",
                        help="vicuna's and the direct engine's dtype (FastChat runs fp32 on CPU whatever this says): "
                             "float32 for a same-precision comparison, auto for defaults vs defaults")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every target (OMP_NUM_THREADS for the servers); default: torch's own")
    parser.add_argument("--max-foreign", type=float, default=0.10, help="warn when others took more of the CPUs")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp") / f"bench-serve-{os.getpid()}")
    parser.add_argument("--json", default=None, help="write results here (default benchmarks/records/)")
    args = parser.parse_args()

    info = machine_info()
    print_machine(info)
    thread_env = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    print(f"torch threads per target: {args.threads or 'default'}", flush=True)
    from vicuna_cli.core import models
    from vicuna_cli.core.templates import get_template

    resolved = models.resolve(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    template = get_template(TEMPLATE, tokenizer)
    sizes = {c: max(args.waves * c, args.min_requests) for c in args.concurrency}
    pool = load_prompts(args.prompts, sum(sizes.values()), args.seed, tokenizer, args.max_prompt_tokens)
    per_level, i = {}, 0
    for c, n in sizes.items():
        per_level[c], i = pool[i:i + n], i + n

    prompt_check = "not checked"
    started: list[Any] = []
    targets: dict[str, Any] = {}
    worker_memory: PeakRss | None = None  # vicuna's worker, when this script started it
    try:
        if "fastchat" in args.targets:
            if args.fastchat_url:
                targets["fastchat"] = HttpTarget("fastchat", args.fastchat_url, args.model, [])
            else:
                stack = FastChatStack(args.fastchat_venv, resolved.path, args.model, TEMPLATE,
                                      log_dir=args.log_dir / "fastchat", start_timeout=args.start_timeout, env=thread_env)
                started.append(stack.start())
                targets["fastchat"] = HttpTarget("fastchat", stack.base_url, args.model, stack.pids())
            if (args.fastchat_venv / "bin" / "python").is_file():
                prompt_check = check_same_prompt(args.fastchat_venv, template)
        if "vicuna" in args.targets:
            if args.vicuna_url:
                targets["vicuna"] = HttpTarget("vicuna", args.vicuna_url, args.model, [])
            else:
                server = VicunaServer(args.model, args.dtype, args.log_dir, args.vicuna_arg, args.start_timeout, thread_env)
                started.append(server)
                targets["vicuna"] = server.start()
                worker_memory = server.worker_memory()
        if "direct" in args.targets:
            targets["direct"] = DirectTarget(args.model, args.dtype)
        print(f"prompt template {TEMPLATE}: FastChat vs vicuna render {prompt_check}; {len(pool)} prompts; "
              f"levels {sizes}", flush=True)
        for target in targets.values():
            asyncio.run(warm_up(target, pool[0], args))

        levels: dict[int, dict[str, dict]] = {}
        order = [t for t in ("vicuna", "fastchat", "direct") if t in targets]
        for index, c in enumerate(args.concurrency):
            levels[c] = {}
            names = [n for n in (order if index % 2 == 0 else order[::-1]) if n != "direct" or c == 1]
            measured_memory = worker_memory is not None and "vicuna" in names and worker_memory.reset()
            runs = run_level({n: targets[n] for n in names}, c, per_level[c], args)
            for name in names:
                prompts = per_level[c]
                results, duration, foreign, load_before, load_after = runs[name]
                count_tokens(results, tokenizer, prompts, template)
                m = metrics(results, duration)
                m.update(foreign=foreign, load_before=load_before, load_after=load_after)
                if name == "vicuna" and measured_memory:
                    memory = worker_memory.read()
                    m.update(worker_peak_rss_mb=memory["peak_rss_mb"], worker_rss_after_mb=memory["rss_mb"])
                if foreign > args.max_foreign:
                    print(f"warning: other processes took {foreign:.0%} of the CPUs during {name} at c={c}")
                levels[c][name] = m
                print(f"c={c} {name}: {m['completed']} ok, {m['failed']} failed, {m['output_throughput']:.1f} out tok/s, "
                      f"p50 TTFT {m['ttft_ms']['median']:.0f} ms, foreign CPU {foreign:.0%}", flush=True)
            print_level(c, {n: levels[c][n] for n in order if n in levels[c]})
    finally:
        for item in reversed(started):
            item.stop()

    print("\n### goals\n")
    print(markdown_table(["level", "measure", "measured", "goal", ""], verdicts(levels)))
    path = write_results("serve", {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                   "prompt_check": prompt_check, "levels": {str(c): r for c, r in levels.items()}},
                         args.json)
    print(f"\nload average at end: {loadavg()}; results: {path}")


if __name__ == "__main__":
    main()
