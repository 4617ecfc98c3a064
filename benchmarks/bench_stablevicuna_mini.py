"""A miniature StableVicuna on this CPU, end to end through the `vicuna` command: SFT → reward model
→ PPO, and SFT → DPO, each stage's wall time and the metric that shows it worked.

    python benchmarks/bench_stablevicuna_mini.py [--work-dir /tmp/sv-mini] [--pairs 240]
                                                 [--vicuna-home /tmp/vh] [--record FILE.json]

Data on this machine (no Hub): SFT on recipes/data/mini-sharegpt.json (a stand-in for the
OASST1 + GPT4All + Alpaca mix, which cannot be downloaded here); preference pairs from
../shared/data/hh-rlhf through `vicuna data pairs`, the first --pairs of them, 10 % held out by
each stage. The model is the embedded SmolLM2-135M-Instruct. Stages run one after another in
fresh processes; each one's figures come from its own run dir (metrics.jsonl, samples.jsonl).
The step counts are tiny: this shows the path works and what each stage costs here, not a model
worth chatting with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, markdown_table, print_machine  # noqa: E402

ROOT = HERE.parent
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
VICUNA = Path(sys.executable).parent / "vicuna"


def run(name: str, args: list, env: dict, log: Path) -> float:
    """Run one `vicuna` stage, its output to `log`; the wall time in seconds (a failure stops here)."""
    print(f"$ vicuna {' '.join(map(str, args))}", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([VICUNA, *map(str, args)], env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"stage {name} failed (exit {done.returncode}); see {log}")
    return seconds


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sv-mini"))
    parser.add_argument("--pairs", type=int, default=240, help="HH-RLHF pairs used by rm, ppo and dpo")
    parser.add_argument("--vicuna-home", type=Path, default=Path(os.environ.get("VICUNA_HOME", "/tmp/vh")))
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    env = dict(os.environ, VICUNA_HOME=str(args.vicuna_home))
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    common = ["--max-length", 256, "--seed", 0, "--log-every", 1, "--overwrite", "--precision", "fp32"]
    times: dict[str, float] = {}

    times["pairs"] = run("pairs", ["data", "pairs", HH, "-o", work / "all_pairs.jsonl", "--overwrite"], env, work / "pairs.log")
    lines = (work / "all_pairs.jsonl").read_text().splitlines()[:args.pairs]
    (work / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    times["sft"] = run("sft", ["train", "sft", "-m", "smollm2-135m-instruct", "--data", ROOT / "recipes" / "data" / "mini-sharegpt.json",
                               "-o", work / "sft", "--max-steps", 12, "--global-batch-size", 4, "--learning-rate", 2e-5,
                               "--eval-split", 0.1, *common], env, work / "sft.log")
    times["rm"] = run("rm", ["train", "rm", "-m", work / "sft", "--data", work / "pairs.jsonl", "-o", work / "rm",
                             "--max-steps", 12, "--global-batch-size", 8, "--learning-rate", 2e-5, "--eval-split", 0.1,
                             *common], env, work / "rm.log")
    times["ppo"] = run("ppo", ["train", "ppo", "-m", work / "sft", "--reward-model", work / "rm", "--prompts", work / "pairs.jsonl",
                               "-o", work / "ppo", "--max-steps", 6, "--rollout-batch-size", 8, "--max-new-tokens", 32,
                               "--learning-rate", 1e-5, "--log-samples", 1, *common], env, work / "ppo.log")
    times["dpo"] = run("dpo", ["train", "dpo", "-m", work / "sft", "--data", work / "pairs.jsonl", "-o", work / "dpo",
                               "--max-steps", 12, "--global-batch-size", 8, "--learning-rate", 5e-6, "--eval-split", 0.1,
                               *common], env, work / "dpo.log")
    times["chat"] = run("chat", ["chat", "-m", work / "ppo", "--temperature", 0, "--max-new-tokens", 24,
                                 "-p", "How do I make a cup of tea?"], env, work / "chat.log")

    sft, rm, ppo, dpo = (metrics(work / n) for n in ("sft", "rm", "ppo", "dpo"))
    ppo_steps = [m for m in ppo if "reward" in m]  # mean RM score of the step's rollouts
    final = {
        "sft": {"first_loss": next(m["loss"] for m in sft if "loss" in m), "last_loss": [m["loss"] for m in sft if "loss" in m][-1],
                "eval_loss": [m["eval_loss"] for m in sft if "eval_loss" in m][-1]},
        "rm": {"last_loss": [m["loss"] for m in rm if "loss" in m][-1],
               "eval_accuracy": [m["eval_accuracy"] for m in rm if "eval_accuracy" in m][-1]},
        "ppo": {"rewards": [m["reward"] for m in ppo_steps], "kl": [m.get("kl") for m in ppo_steps]},
        "dpo": {"last_loss": [m["loss"] for m in dpo if "loss" in m][-1],
                "eval_accuracy": [m.get("eval_rewards/accuracies") for m in dpo if "eval_rewards/accuracies" in m][-1:]},
        "chat": (work / "chat.log").read_text().strip().splitlines()[-1:],
    }
    rows = [("data pairs", f"{times['pairs']:.0f}", f"{len(lines)} pairs used"),
            ("train sft (12 steps of 4)", f"{times['sft']:.0f}", f"loss {final['sft']['first_loss']:.3f} → {final['sft']['last_loss']:.3f}, eval {final['sft']['eval_loss']:.3f}"),
            ("train rm (12 steps of 8 pairs)", f"{times['rm']:.0f}", f"held-out pair accuracy {final['rm']['eval_accuracy']:.1%}"),
            ("train ppo (6 steps of 8 rollouts)", f"{times['ppo']:.0f}", "mean reward " + " → ".join(f"{r:.3f}" for r in final["ppo"]["rewards"][::max(1, len(final["ppo"]["rewards"]) - 1)])
             + ", KL " + " → ".join(f"{k:.3f}" for k in final["ppo"]["kl"][::max(1, len(final["ppo"]["kl"]) - 1)] if k is not None)),
            ("train dpo (12 steps of 8 pairs)", f"{times['dpo']:.0f}", f"loss {final['dpo']['last_loss']:.3f}, held-out reward accuracy "
             + (f"{final['dpo']['eval_accuracy'][0]:.1%}" if final["dpo"]["eval_accuracy"] else "n/a")),
            ("chat -m the PPO run dir", f"{times['chat']:.0f}", " ".join(final["chat"])[:80])]
    print()
    print(markdown_table(("stage", "wall s", "what shows it worked"), rows))
    print(f"\ntotal {sum(times.values()):.0f} s")
    record = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": info,
              "seconds": times, "figures": final}
    path = args.record or HERE / "records" / f"stablevicuna-mini-{started:%Y%m%d-%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
