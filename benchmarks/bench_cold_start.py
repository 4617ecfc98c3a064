#!/usr/bin/env python
"""Cold start: from launching `vicuna chat --prompt ...` to the first byte of the answer.

Each round launches, as a fresh subprocess with stdin not a terminal (it is /dev/null),

  A  vicuna chat --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 8
  B  a minimal transformers script (the peer): AutoTokenizer + AutoModelForCausalLM from the same
     converted model dir, the same chat-templated prompt, greedy
     `model.generate(..., streamer=TextStreamer)`, 8 new tokens

and reads its stdout unbuffered (os.read on the pipe) to time the first byte of the answer and the
process exit. A and B alternate (A B A B ...) so that drift in machine load hits both alike. One
untimed warm-up run of each comes first (page cache, .pyc files), unless --warmup 0.

It also times `vicuna --help` and `vicuna --version` (wall time of the whole process).

The converted model must already be cached ($VICUNA_HOME/models/<alias>): run any `vicuna chat`
once first. Example:

    VICUNA_HOME=/tmp/vh python benchmarks/bench_cold_start.py --rounds 5

Goals: first answer byte < 3 s (median); `--help` and `--version` well under 1 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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


def time_first_byte(cmd: list[str], env: dict[str, str]) -> dict:
    """Launch `cmd`, return seconds to the first stdout byte and to exit, plus the output."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env, bufsize=0)
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
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - start


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
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer script")
    parser.add_argument("--json", metavar="PATH", help="write results here (default: benchmarks/results/cold_start-<time>.json)")
    parser.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    env = dict(os.environ)
    path = model_dir(args.model)
    vicuna = vicuna_executable()
    cmd_a = [vicuna, "chat", "--prompt", args.prompt, "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
    if args.model != DEFAULT_MODEL:
        cmd_a[2:2] = ["--model", args.model]
    cmd_b = [sys.executable, "-c", PEER_SCRIPT, str(path), args.prompt, str(args.max_new_tokens)]
    contenders = {"vicuna chat": cmd_a}
    if not args.no_peer:
        contenders["transformers peer"] = cmd_b

    info = machine_info()
    print("# Cold start benchmark\n")
    print_machine(info)
    print(f"model: {args.model} ({path})")
    print(f"A: {' '.join(cmd_a[1:3])} {args.prompt!r} {' '.join(cmd_a[4:])}  (stdin /dev/null, stdout a pipe)")
    if not args.no_peer:
        print("B: python -c <AutoModelForCausalLM + TextStreamer script>, same model dir, prompt and token budget")
    print(f"rounds: {args.rounds} (alternating A B), warm-up runs: {args.warmup}\n", flush=True)

    for _ in range(args.warmup):
        for name, cmd in contenders.items():
            time_first_byte(cmd, env)

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for i in range(args.rounds):
        for name, cmd in contenders.items():
            result = time_first_byte(cmd, env)
            runs[name].append(result)
            print(
                f"round {i + 1} {name:<17} first byte {result['first_byte']:6.2f} s · exit {result['exit']:6.2f} s "
                f"· load {loadavg()}",
                flush=True,
            )

    cli_times = {}
    for label, argv in (("vicuna --help", ["--help"]), ("vicuna --version", ["--version"])):
        time_command([vicuna, *argv], env)  # warm-up
        cli_times[label] = [time_command([vicuna, *argv], env) for _ in range(args.rounds)]

    print()
    for name, results in runs.items():
        print(f"{name} answer: {results[0]['stdout'].strip()!r}")
    vicuna_stats_line = [line for line in runs["vicuna chat"][0]["stderr"].splitlines() if "first token" in line]
    if vicuna_stats_line:
        print(f"vicuna stderr (round 1): {vicuna_stats_line[-1].strip()}")

    summaries = {}
    rows = []
    for name, results in runs.items():
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
    print(f"\nload average at end: {loadavg()}")

    if not args.no_json:
        data = {
            "benchmark": "cold_start",
            "machine": {**info, "loadavg_at_end": loadavg()},
            "settings": {**vars(args), "model_dir": str(path), "command_a": cmd_a[1:], "peer": "python -c PEER_SCRIPT"},
            "runs": {name: [{k: r[k] for k in ("first_byte", "exit")} for r in rs] for name, rs in runs.items()},
            "cli_runs": cli_times,
            "summary": summaries,
            "goals": {"first_byte_s": FIRST_BYTE_GOAL, "cli_s": CLI_GOAL},
            "pass": verdicts,
        }
        print(f"results: {write_results('cold_start', data, args.json)}")


if __name__ == "__main__":
    main()
