#!/usr/bin/env python
"""Cold start: from launching `vicuna chat --prompt ...` to the first byte of the answer.

Each round launches, as a fresh subprocess with stdin not a terminal (it is /dev/null),

  A  vicuna chat --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 8
  B  a minimal transformers script (the peer): AutoTokenizer + AutoModelForCausalLM from the same
     converted model dir, the same chat-templated prompt, greedy
     `model.generate(..., streamer=TextStreamer)`, 8 new tokens

and reads its stdout unbuffered (os.read on the pipe) to time the first byte of the answer and the
process exit. A and B are interleaved so that drift in machine load hits both alike; by default the
order flips every round (A B, B A, A B, ...) so neither always runs first (--order fixed: A B A B). One
untimed warm-up run of each comes first (page cache, .pyc files), unless --warmup 0.

A round during which other processes kept the CPUs busy (or waiting on disk) is repeated
(--max-foreign, --retries; --wait-idle waits for a quiet machine first): on a shared 2-core box
torch slows down several times over when another process computes, which would measure the
neighbours, not vicuna.

It also times `vicuna --help` and `vicuna --version` (wall time of the whole process), and breaks
vicuna's time to the first token into steps (imports, model load, prefill), timestamped inside a
process that takes the same path as `vicuna chat` (--breakdown-runs).

The converted model must already be cached ($VICUNA_HOME/models/<alias>): run any `vicuna chat`
once first. Example:

    VICUNA_HOME=/tmp/vh python benchmarks/bench_cold_start.py --rounds 5 --wait-idle 600

Goals: first answer byte < 3 s (median); `--help` and `--version` well under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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

PROMPT = "What is the capital of France?"
FIRST_BYTE_GOAL = 3.0
CLI_GOAL = 1.0

# The peer: what a user would write with plain transformers. Same dtype rule as vicuna on CPU
# (bf16 when the CPU has native bf16, else fp32), same attention (sdpa), same chat template.
PEER_SCRIPT = r"""
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

path, prompt, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
if torch.cuda.is_available():
    device, dtype = "cuda", torch.bfloat16
else:
    device = "cpu"
    dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
inputs = tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(device)
streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
with torch.inference_mode():
    model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
"""

# Where vicuna's cold start goes: the same steps `vicuna chat` takes, each timestamped (wall clock,
# so the parent can place them on its own timeline from the moment it launched the process).
BREAKDOWN_SCRIPT = r"""
import json, sys, time
marks = []
def mark(name):
    marks.append((name, time.time()))
import vicuna_cli.cli
mark("python startup + import vicuna_cli.cli (typer, rich)")
import torch
mark("import torch")
from vicuna_cli.chat.runner import ChatConfig
from vicuna_cli.chat.backends import LocalBackend
mark("import vicuna chat modules (pydantic, templates, engine)")
from vicuna_cli.core import console
console.info = lambda message: None
kwargs = {"implementation": sys.argv[4]} if sys.argv[4] != "default" else {}
if "quantize" in ChatConfig.model_fields:  # the weights `vicuna chat` loads by default
    kwargs["quantize"] = ChatConfig.model_fields["quantize"].default
backend = LocalBackend(sys.argv[1], None, **kwargs)
impl = getattr(backend.loaded, "implementation", "transformers")
impl += f", {getattr(backend.loaded, 'quantization', 'none')} weights"
mark(f"models.load, {impl}: tokenizer + model" + (" (+ transformers imports)" if "transformers" in sys.modules else ""))
from vicuna_cli.core.generate import SamplingParams
ids = backend.prompt_ids([{"role": "user", "content": sys.argv[2]}])
mark("render template + encode")
stream = backend.engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=int(sys.argv[3])))
first = next(iter(stream))
mark("prefill + first token + detokenize")
print(json.dumps({"marks": marks, "transformers_imported": "transformers" in sys.modules}))
"""


def vicuna_executable() -> str:
    """The `vicuna` console script next to this interpreter (the project venv), else on PATH."""
    candidate = Path(sys.executable).parent / "vicuna"
    if candidate.is_file():
        return str(candidate)
    import shutil

    found = shutil.which("vicuna")
    if not found:
        sys.exit("error: the `vicuna` command is not installed (pip install -e . in the project venv)")
    return found


def model_dir(model: str) -> Path:
    """The local HF dir both A and B load. Never converts or downloads: that is not a cold start."""
    from vicuna_cli.core.models import ALIASES
    from vicuna_cli.core.store import models_dir

    if model in ALIASES:
        path = models_dir() / model
        if not path.is_dir():
            sys.exit(
                f"error: {model} is not converted yet ({path} is missing); run "
                f"`vicuna chat -m {model} --prompt hi` once first (or set VICUNA_HOME)"
            )
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    sys.exit("error: --model must be an alias that is already converted, or a local model directory")


# Both contenders start in an empty directory: `python -c` puts the working directory on sys.path,
# and from the repo root the project's `kernels/` folder would shadow the Hub package of that name
# (transformers probes for it while importing, which costs the peer ~0.1 s).
NEUTRAL_CWD = tempfile.mkdtemp(prefix="vicuna-bench-")


def time_first_byte(cmd: list[str], env: dict[str, str]) -> dict:
    """Launch `cmd`, return seconds to the first stdout byte and to exit, plus the output."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env, bufsize=0, cwd=NEUTRAL_CWD
        )
        fd = proc.stdout.fileno()
        first_byte = None
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if first_byte is None:
                first_byte = time.perf_counter() - start
            chunks.append(chunk)
        proc.wait()
        total = time.perf_counter() - start
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0 or first_byte is None:
        sys.exit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode} with no answer:\n{stderr}")
    return {
        "first_byte": first_byte,
        "exit": total,
        "stdout": b"".join(chunks).decode(errors="replace"),
        "stderr": stderr,
    }


def time_command(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True,
        cwd=NEUTRAL_CWD,
    )
    return time.perf_counter() - start


def breakdown(model: str, prompt: str, max_new_tokens: int, implementation: str | None, env: dict[str, str]) -> list[tuple[str, float]]:
    """Seconds spent in each step of vicuna's path to the first token, the first from launch."""
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", BREAKDOWN_SCRIPT, model, prompt, str(max_new_tokens), implementation or "default"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=NEUTRAL_CWD,
    )
    if out.returncode != 0:
        sys.exit(f"error: the breakdown run failed:\n{out.stderr}")
    marks = json.loads(out.stdout.strip().splitlines()[-1])["marks"]
    steps, previous = [], start
    for name, t in marks:
        steps.append((name, t - previous))
        previous = t
    return steps


def fmt(stats: dict) -> list[str]:
    return [f"{stats['median']:.2f}", f"{stats['min']:.2f}", f"{stats['max']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time from launching `vicuna chat --prompt ...` to the first answer byte, "
        "side by side with a plain transformers script; plus `vicuna --help/--version` wall time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", "-n", type=int, default=5, help="timed A/B rounds (and --help/--version runs)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a converted alias or a local model directory")
    parser.add_argument("--prompt", default=PROMPT, help="the question asked")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--implementation", choices=["auto", "native", "transformers"],
                        help="pass --implementation to vicuna chat (default: not passed, vicuna decides)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer script")
    parser.add_argument("--breakdown-runs", type=int, default=3, help="runs of the per-step timing of vicuna's path (0: skip)")
    parser.add_argument("--json", metavar="PATH", help="JSON output path (None: benchmarks/records/cold_start-<time>.json)")
    parser.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    parser.add_argument("--order", choices=["alternate", "fixed"], default="alternate",
                        help="alternate: A B, B A, A B, ... (neither side always runs first); fixed: A B, A B, ...")
    parser.add_argument("--max-foreign", type=float, default=0.05,
                        help="repeat a round when other processes took more than this share of the CPUs during it")
    parser.add_argument("--retries", type=int, default=5,
                        help="how often a noisy round may be repeated; still noisy after that: left out of the figures")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each round, wait up to this long for other processes to leave the CPUs idle")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    env = dict(os.environ)
    path = model_dir(args.model)
    vicuna = vicuna_executable()
    cmd_a = [vicuna, "chat", "--prompt", args.prompt, "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
    if args.model != DEFAULT_MODEL:
        cmd_a[2:2] = ["--model", args.model]
    if args.implementation:
        cmd_a[2:2] = ["--implementation", args.implementation]
    cmd_b = [sys.executable, "-c", PEER_SCRIPT, str(path), args.prompt, str(args.max_new_tokens)]
    contenders = {"vicuna chat": cmd_a}
    if not args.no_peer:
        contenders["transformers peer"] = cmd_b

    info = machine_info()
    print("# Cold start benchmark\n")
    print_machine(info)
    print(f"model: {args.model} ({path})")
    shown = " ".join(repr(a) if " " in a else a for a in cmd_a[1:])
    print(f"A: vicuna {shown}  (stdin /dev/null, stdout a pipe)")
    if not args.no_peer:
        print("B: python -c <AutoModelForCausalLM + TextStreamer script>, same model dir, prompt and token budget")
    print(f"rounds: {args.rounds} (interleaved, order {args.order}), warm-up runs: {args.warmup}\n", flush=True)

    for _ in range(args.warmup):
        for name, cmd in contenders.items():
            time_first_byte(cmd, env)

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    foreign, repeats = [], 0
    for i in range(args.rounds):
        for attempt in range(args.retries + 1):
            if args.wait_idle:
                status = wait_for_idle(args.wait_idle)
                if not status.startswith("idle"):
                    print(f"warning: {status}", flush=True)
            order = list(contenders.items())
            if args.order == "alternate" and i % 2 == 1:
                order.reverse()
            with ForeignCpu(count_iowait=True) as fc:
                results = {name: time_first_byte(cmd, env) for name, cmd in order}
            if fc.fraction <= args.max_foreign or attempt == args.retries:
                break
            repeats += 1
            print(f"round {i + 1}: other processes took {fc.fraction:.0%} of the CPUs meanwhile; repeating the round",
                  flush=True)
        foreign.append(fc.fraction)
        for name in contenders:
            result = results[name]
            runs[name].append(result)
            print(
                f"round {i + 1} {name:<17} first byte {result['first_byte']:6.2f} s · exit {result['exit']:6.2f} s "
                f"· CPU taken by other processes {fc.fraction:.0%}",
                flush=True,
            )

    cli_times = {}
    for label, argv in (("vicuna --help", ["--help"]), ("vicuna --version", ["--version"])):
        time_command([vicuna, *argv], env)  # warm-up
        cli_times[label] = [time_command([vicuna, *argv], env) for _ in range(args.rounds)]

    print()
    for name, results in runs.items():
        print(f"{name} answer: {results[0]['stdout'].strip()!r}")
    for line in runs["vicuna chat"][0]["stderr"].splitlines():
        if "first token" in line or line.startswith("model "):
            print(f"vicuna stderr (round 1): {line.strip()}")

    clean = [f <= args.max_foreign for f in foreign]
    if not any(clean):
        print("warning: every round shared the CPUs with other processes: figures are unreliable")
        clean = [True] * len(foreign)
    summaries = {}
    rows = []
    for name, results in runs.items():
        results = [r for r, ok in zip(results, clean) if ok]
        fb = summary([r["first_byte"] for r in results])
        ex = summary([r["exit"] for r in results])
        summaries[name] = {"first_byte": fb, "exit": ex}
        rows.append([name, *fmt(fb), f"{ex['median']:.2f}"])
    print("\nFirst answer byte (s), from launch; and process exit (s):\n")
    print(markdown_table(["command", "first byte median", "min", "max", "exit median"], rows))

    vic_fb = summaries["vicuna chat"]["first_byte"]["median"]
    verdicts = {"first_byte": vic_fb < FIRST_BYTE_GOAL}
    print(f"\nGoal: vicuna first byte < {FIRST_BYTE_GOAL:.0f} s (median): "
          f"{'PASS' if verdicts['first_byte'] else 'FAIL'} ({vic_fb:.2f} s)")
    if "transformers peer" in summaries:
        peer = summaries["transformers peer"]["first_byte"]["median"]
        print(f"vicuna / peer first-byte ratio: {vic_fb / peer:.2f} (< 1 means vicuna answers sooner)")
        print("note: TextStreamer prints whole words, so the peer's first byte comes one token later than vicuna's.")

    cli_rows = []
    for label, times in cli_times.items():
        s = summary(times)
        summaries[label] = s
        verdicts[label] = s["median"] < CLI_GOAL
        cli_rows.append([label, *fmt(s), "PASS" if verdicts[label] else "FAIL"])
    print("\nCLI wall time (s):\n")
    print(markdown_table(["command", "median", "min", "max", f"goal < {CLI_GOAL:.0f} s"], cli_rows))
    steps_runs = []
    for _ in range(args.breakdown_runs):
        for attempt in range(args.retries + 1):
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            with ForeignCpu(count_iowait=True) as fc:
                steps_run = breakdown(args.model, args.prompt, args.max_new_tokens, args.implementation, env)
            if fc.fraction <= args.max_foreign or attempt == args.retries:
                break
        steps_runs.append(steps_run)
    steps = []
    if steps_runs:
        import statistics

        steps = [(name, statistics.median(run[i][1] for run in steps_runs)) for i, (name, _) in enumerate(steps_runs[0])]
        print(f"\nWhere vicuna's time to first token goes (in-process timestamps, median of {len(steps_runs)} runs):\n")
        print(markdown_table(["step", "seconds", "cumulative"],
                             [[name, f"{sec:.2f}", f"{sum(x for _, x in steps[: i + 1]):.2f}"]
                              for i, (name, sec) in enumerate(steps)]))
    print(f"\nCPU taken by other processes per round: {', '.join(f'{x:.0%}' for x in foreign)} "
          f"({repeats} round(s) repeated for noise; {sum(clean)} of {len(clean)} rounds used)")
    print(f"load average at end: {loadavg()}")

    if not args.no_json:
        data = {
            "benchmark": "cold_start",
            "machine": {**info, "loadavg_at_end": loadavg()},
            "settings": {**vars(args), "model_dir": str(path), "command_a": cmd_a[1:], "peer": "python -c PEER_SCRIPT"},
            "runs": {name: [{k: r[k] for k in ("first_byte", "exit")} for r in rs] for name, rs in runs.items()},
            "cli_runs": cli_times,
            "breakdown_median": steps,
            "foreign_cpu_per_round": foreign,
            "rounds_repeated_for_noise": repeats,
            "rounds_used": sum(clean),
            "breakdown_runs": steps_runs,
            "summary": summaries,
            "goals": {"first_byte_s": FIRST_BYTE_GOAL, "cli_s": CLI_GOAL},
            "pass": verdicts,
        }
        print(f"results: {write_results('cold_start', data, args.json)}")


if __name__ == "__main__":
    main()
