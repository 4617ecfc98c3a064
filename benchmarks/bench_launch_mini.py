"""Wall time per stage of `vicuna launch recipes/mini-vicuna.yaml --local` (the whole Vicuna
pipeline in miniature), and the cost table of the GPU training recipes from the shipped prices.

    python benchmarks/bench_launch_mini.py [--env K=V ...] [--record benchmarks/records/launch-mini.json]

A stage runs from its `== N ...` line in the recipe's output to the next one (the last one to the
end of the launch); `setup` is the time before the first line. The load average before and after
is recorded: on a shared 2-core machine it changes every figure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine_info, print_machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGE = re.compile(r"^== (\d+) (.*)$")


def run_mini(env: list[str]) -> dict:
    command = [sys.executable, "-m", "vicuna_cli", "launch", str(ROOT / "recipes/mini-vicuna.yaml"), "--local"]
    for item in env:
        command += ["--env", item]
    started = time.monotonic()
    marks: list[tuple[str, float]] = [("setup", 0.0)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = (tail + [line.rstrip()])[-40:]
        match = STAGE.match(line.strip())
        if match:
            marks.append((match.group(2), time.monotonic() - started))
    code = proc.wait()
    total = time.monotonic() - started
    stages = {name: round((marks[i + 1][1] if i + 1 < len(marks) else total) - at, 1)
              for i, (name, at) in enumerate(marks)}
    return {"command": " ".join(command), "exit_code": code, "total_s": round(total, 1), "stages_s": stages,
            "output_tail": tail}


def cost_table() -> list[dict]:
    from vicuna_cli.launch import cost, recipe

    rows = []
    for name, original in (("train-vicuna-7b.yaml", "~$140 spot / ~$500 on demand"),
                           ("train-vicuna-13b.yaml", "~$300 spot / ~$1K on demand")):
        loaded = recipe.load(ROOT / "recipes" / name)
        line = cost.estimate(loaded).lines[0]
        rows.append({"recipe": name, "accelerators": line.accelerators, "nodes": line.nodes, "hours": line.hours,
                     "spot_per_h": line.price.spot, "on_demand_per_h": line.price.on_demand,
                     "spot_total": round(line.total(True), 2), "on_demand_total": round(line.total(False), 2),
                     "original": original, "prices": f"{line.price.source} ({line.price.date})"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE passed to the recipe (repeatable)")
    parser.add_argument("--record", default=None, help="also write the JSON record here")
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    result = run_mini(args.env)
    result["loadavg_at_end"] = loadavg()
    costs = cost_table()
    print("\n| stage | wall time (s) |\n| --- | ---: |")
    for stage, seconds in result["stages_s"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **total** | **{result['total_s']:.1f}** |")
    print(f"load average: {info['loadavg_at_start']} at start, {result['loadavg_at_end']} at the end")
    print("\n| recipe | GPUs | hours | spot | on demand | original |\n| --- | --- | ---: | ---: | ---: | --- |")
    for row in costs:
        print(f"| {row['recipe']} | {row['nodes']} × {row['accelerators']} | {row['hours']:g} | "
              f"${row['spot_total']:,.0f} | ${row['on_demand_total']:,.0f} | {row['original']} |")
    data = {"machine": info, "mini": result, "costs": costs}
    path = write_results("launch_mini", data, None)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(data, indent=2) + "\n")
    print(f"record: {path}" + (f", {args.record}" if args.record else ""))
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
