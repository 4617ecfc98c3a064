"""`vicuna train rm` side by side with TRL's RewardTrainer on HH-RLHF harmless-base.

    python benchmarks/bench_rm.py [--steps 10] [--batch 8] [--max-length 256] [--seed 0]
                                  [--work-dir /tmp/bench_rm] [--vicuna-home /tmp/vh]

Data: ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz through `vicuna data pairs`, pairs whose
two sides fit --max-length tokens (the embedded SmolLM2-135M-Instruct's chat template; TRL
filters the same way), split 90/10 by --seed. Both arms start from the same weights (the embedded
model converted to safetensors, with a new one-label score head), see the same tokens (TRL gets
the token ids vicuna renders), and run the same optimizer steps of --batch pairs, AdamW at the
same constant learning rate without warmup, fp32, no gradient checkpointing, seed --seed:

- vicuna: `vicuna train rm` (pairs packed into rows of 2 x --max-length tokens);
- TRL: `RewardTrainer` (one padded micro-batch of 2 x --batch sequences per step), in a child
  process of this script with a callback that times each optimizer step.

Each arm runs in a fresh process, A B B A ... for --rounds rounds (the order flips each round, so
a neighbour's load falls on both); time per step is the median over every round's steps after
the first; peak RSS is the largest of the rounds' high-water marks (bench_train.measured). Both
trained models are then scored on the held-out pairs by the same code (vicuna's packed scorer,
`vicuna_cli.train.score.RewardModel`), with 95 % bootstrap intervals (2000 resamples), next to two
baselines: a coin (50 %) and "the longer answer wins" (ties count one half).
"""

from __future__ import annotations

import sys

if len(sys.argv) > 1 and sys.argv[1] == "--trl-child":
    import json
    import time

    def _trl_child(spec_path: str) -> None:
        import torch
        import transformers
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        spec = json.loads(open(spec_path).read())
        torch.manual_seed(spec["seed"])
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
        model = transformers.AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        marks: list[float] = []

        class Probe(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                marks.append(time.perf_counter())

        args = RewardConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, seed=spec["seed"],
                            bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
                            logging_steps=1, max_length=None, dataloader_num_workers=0)
        data = Dataset.from_list([{"chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in spec["pairs"]])
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data, callbacks=[Probe()])
        trainer.train()
        trainer.save_model(spec["out"])
        steps = [b - a for a, b in zip(marks[0::2], marks[1::2])]
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        open(spec["result"], "w").write(json.dumps({"step_s": steps, "losses": losses}))

    _trl_child(sys.argv[2])
    sys.exit(0)

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, markdown_table, print_machine  # noqa: E402
from bench_train import measured  # noqa: E402

HH = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
VICUNA = Path(sys.executable).parent / "vicuna"


def prepare(args: argparse.Namespace, env: dict) -> dict:
    from transformers import AutoTokenizer

    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.preferences import read_pairs
    from vicuna_cli.train.rm import build_pair_samples

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = Path(subprocess.run([VICUNA, "models", "pull", "smollm2-135m-instruct"], env=env, check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    pairs_file = work / "pairs.jsonl"
    subprocess.run([VICUNA, "data", "pairs", str(args.data), "-o", pairs_file, "--overwrite"], env=env, check=True,
                   capture_output=True)
    pairs = read_pairs([str(pairs_file)], Counter())
    tokenizer = AutoTokenizer.from_pretrained(model)
    notes: Counter = Counter()
    samples = build_pair_samples(pairs, tokenizer, template_for_model(tokenizer), args.max_length, notes)
    fitting = {s.id for s in samples}
    kept = [p for p in pairs if p["id"] in fitting]
    order = list(range(len(kept)))
    random.Random(args.seed).shuffle(order)
    n_held = round(0.1 * len(kept))
    held = [kept[i] for i in sorted(order[:n_held])]
    train = [kept[i] for i in sorted(order[n_held:])]
    for name, rows in (("train", train), ("held", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_id = {s.id: s for s in samples}
    return {"model": model, "pairs": len(pairs), "fitting": len(kept), "dropped": dict(notes), "train": train,
            "held": held, "train_ids": [{"chosen": by_id[p["id"]].chosen, "rejected": by_id[p["id"]].rejected} for p in train]}


def vicuna_arm(args: argparse.Namespace, prep: dict, env: dict, tag: str = "") -> dict:
    out = args.work_dir / f"vicuna-run{tag}"
    cmd = [VICUNA, "train", "rm", "-m", prep["model"], "--data", args.work_dir / "train.jsonl", "-o", out, "--overwrite",
           "--max-steps", args.steps, "--global-batch-size", args.batch, "--max-length", args.max_length,
           "--learning-rate", args.lr, "--lr-schedule", "constant", "--warmup-steps", 0, "--seed", args.seed,
           "--log-every", 1, "--device", "cpu", "--precision", "fp32"]
    run = measured(cmd, args.work_dir / f"vicuna{tag}.log", env)
    if run["returncode"]:
        sys.exit(f"vicuna arm failed; see {run['log']}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step_s"] for m in metrics if "step_s" in m]
    return {**run, "step_s": steps, "losses": [m["loss"] for m in metrics if "loss" in m], "model_dir": str(out)}


def trl_arm(args: argparse.Namespace, prep: dict, env: dict, tag: str = "") -> dict:
    out = args.work_dir / f"trl-run{tag}"
    spec = {"model": str(prep["model"]), "out": str(out), "batch": args.batch, "steps": args.steps, "lr": args.lr,
            "seed": args.seed, "pairs": prep["train_ids"], "result": str(args.work_dir / f"trl-result{tag}.json")}
    (args.work_dir / f"trl-spec{tag}.json").write_text(json.dumps(spec))
    run = measured([sys.executable, __file__, "--trl-child", args.work_dir / f"trl-spec{tag}.json"],
                   args.work_dir / f"trl{tag}.log", env)
    if run["returncode"]:
        sys.exit(f"TRL arm failed; see {run['log']}")
    return {**run, **json.loads(Path(spec["result"]).read_text()), "model_dir": str(out)}


def bootstrap(values: list[float], rounds: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def held_out(model_dir: str, held: list[dict], env_home: str) -> list[float]:
    """1.0 / 0.0 per held-out pair: does the model score chosen above rejected?"""
    os.environ["VICUNA_HOME"] = env_home
    from vicuna_cli.train.score import RewardModel

    model = RewardModel(model_dir, "cpu", None)
    sequences = model.encode([p["prompt"] + p[side] for p in held for side in ("chosen", "rejected")])
    scores = model.score(sequences, 4096)
    return [float(scores[2 * k] > scores[2 * k + 1]) for k in range(len(held))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HH)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, interleaved (A B B A ...)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_rm"))
    parser.add_argument("--vicuna-home", type=Path, default=Path(os.environ.get("VICUNA_HOME", "/tmp/vh")))
    parser.add_argument("--record", type=Path, default=None, help="JSON record path (default benchmarks/records/bench_rm-DATE.json)")
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    env = dict(os.environ, VICUNA_HOME=str(args.vicuna_home))
    started = dt.datetime.now(dt.timezone.utc)
    prep = prepare(args, env)
    print(f"pairs {prep['pairs']}, fitting {args.max_length} tokens: {prep['fitting']} "
          f"(train {len(prep['train'])}, held out {len(prep['held'])}); dropped {prep['dropped']}", flush=True)
    runs: dict[str, list[dict]] = {"vicuna": [], "trl": []}
    for r in range(args.rounds):
        order = ("vicuna", "trl") if r % 2 == 0 else ("trl", "vicuna")
        for name in order:
            runs[name].append((vicuna_arm if name == "vicuna" else trl_arm)(args, prep, env, f"-{r}"))
    # Same seed, data and steps: every round trains the same model; the first one is scored.
    arms = {name: {**done[0], "step_s": [s for run in done for s in run["step_s"][1:]] or done[0]["step_s"],
                   "peak_rss_mb": max(run["peak_rss_mb"] for run in done),
                   "foreign_cpu": max(run["foreign_cpu"] for run in done),
                   "rounds": [{k: run[k] for k in ("step_s", "peak_rss_mb", "wall_s", "foreign_cpu")} for run in done]}
            for name, done in runs.items()}
    held = prep["held"]
    for name, arm in arms.items():
        arm["correct"] = held_out(arm["model_dir"], held, str(args.vicuna_home))
    chars = [(sum(len(m["content"]) for m in p["chosen"]), sum(len(m["content"]) for m in p["rejected"])) for p in held]
    longer = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in chars]
    rows, figures = [], {}
    for name, values in (("vicuna train rm", arms["vicuna"]["correct"]), ("TRL RewardTrainer", arms["trl"]["correct"]),
                         ("longer answer wins", longer)):
        low, high = bootstrap(values, args.bootstrap, args.seed)
        figures[name] = {"accuracy": sum(values) / len(values), "ci95": [low, high]}
        rows.append((name, f"{sum(values) / len(values):.1%}", f"[{low:.1%}, {high:.1%}]"))
    rows.append(("coin (baseline)", "50.0%", ""))
    timing = {}
    for name, arm in arms.items():
        timing[name] = {"step_s_median": statistics.median(arm["step_s"]), "peak_rss_mb": arm["peak_rss_mb"],
                        "wall_s": arm["wall_s"], "foreign_cpu": arm["foreign_cpu"], "losses": arm["losses"],
                        "rounds": arm["rounds"]}
    step_ratio = timing["vicuna"]["step_s_median"] / timing["trl"]["step_s_median"]
    rss_ratio = timing["vicuna"]["peak_rss_mb"] / timing["trl"]["peak_rss_mb"]
    trl_low, trl_high = figures["TRL RewardTrainer"]["ci95"]
    within = trl_low <= figures["vicuna train rm"]["accuracy"] <= trl_high
    print()
    print(markdown_table(("arm", "time per step (median)", "peak RSS", "wall", "foreign CPU", "first/last loss"), [
        (name, f"{t['step_s_median']:.2f} s", f"{t['peak_rss_mb']:.0f} MB", f"{t['wall_s']:.0f} s", f"{t['foreign_cpu']:.0%}",
         f"{t['losses'][0]:.3f} / {t['losses'][-1]:.3f}") for name, t in timing.items()]))
    print()
    print(markdown_table(("held-out pairs: " + str(len(held)), "accuracy", "95 % bootstrap interval"), rows))
    print()
    print(markdown_table(("goal", "measured", ""), [
        ("time per step ≤ 0.5× TRL's", f"{step_ratio:.2f}×", "**pass**" if step_ratio <= 0.5 else "**fail**"),
        ("peak RSS ≤ 0.7× TRL's", f"{rss_ratio:.2f}×", "**pass**" if rss_ratio <= 0.7 else "**fail**"),
        ("held-out accuracy within TRL's 95 % interval", f"{figures['vicuna train rm']['accuracy']:.1%} in "
         f"[{trl_low:.1%}, {trl_high:.1%}]", "**pass**" if within else "**fail**")]))
    record = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": info,
              "args": {k: str(v) for k, v in vars(args).items()}, "data": {k: prep[k] for k in ("pairs", "fitting", "dropped")},
              "train_pairs": len(prep["train"]), "held_out_pairs": len(held), "timing": timing, "accuracy": figures,
              "ratios": {"step": step_ratio, "peak_rss": rss_ratio}, "vicuna_within_trl_interval": within}
    path = args.record or HERE / "records" / f"bench_rm-{started:%Y%m%d-%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {path}")


if __name__ == "__main__":
    main()
