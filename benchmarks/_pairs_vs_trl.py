"""What bench_rm.py and bench_dpo.py share: a vicuna preference trainer against its TRL peer on
HH-RLHF pairs.

The pairs come through `vicuna data pairs`; those the method can train on are split 90/10 by
--seed. Both arms see the same token ids and run the same optimizer steps, each in a fresh
process, interleaved A B B A ... over --rounds (the order flips each round, so a neighbour's load
falls on both): time per step is the median over every round's steps after the first, peak RSS
the largest of the rounds' high-water marks (bench_train.measured). Every round trains the same
model (same seed, data and steps); the first round's is scored on the held-out pairs, with 95 %
bootstrap intervals, next to "the longer answer wins" (ties count one half) and a coin.

The TRL arm is the bench script itself run again with `--trl-child SPEC` (see `trl_child`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from _common import machine_info, markdown_table, print_machine
from bench_train import measured

HERE = Path(__file__).resolve().parent
HH = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
VICUNA = Path(sys.executable).parent / "vicuna"


@dataclass(frozen=True)
class Bench:
    """What differs between the two benchmarks, besides how samples are built and scored."""

    method: str  # `vicuna train METHOD`; the record is benchmarks/records/bench_METHOD-DATE.json
    script: str  # the bench script: run again with --trl-child for the TRL arm
    trl_name: str  # "TRL RewardTrainer"
    metric: str  # column header of the held-out table
    goal_title: str
    rss_goal: float  # peak RSS goal as a fraction of TRL's
    fit_note: str = ""  # after "fitting N tokens" in the data line
    vicuna_flags: tuple = ()  # extra `vicuna train METHOD` flags
    trl_spec: dict = field(default_factory=dict)  # extra fields of the TRL child's spec

    @property
    def vicuna_name(self) -> str:
        return f"vicuna train {self.method}"


def parser(doc: str, method: str, lr: float) -> argparse.ArgumentParser:
    """The options both benchmarks take; a script adds its own after these."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HH)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, interleaved (A B B A ...)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--train-pairs", type=int, default=None,
                        help="Train on the first N pairs of the 90 %% split only (the held-out 10 %% stays whole).")
    parser.add_argument("--work-dir", type=Path, default=Path(f"/tmp/bench_{method}"))
    parser.add_argument("--vicuna-home", type=Path, default=Path(os.environ.get("VICUNA_HOME", "/tmp/vh")))
    parser.add_argument("--record", type=Path, default=None,
                        help=f"JSON record path (default benchmarks/records/bench_{method}-DATE.json)")
    return parser


# ---------------------------------------------------------------- TRL child process

def trl_child(spec_path: str, make_trainer: Callable) -> None:
    """Train with TRL as the spec says, timing each optimizer step; write {"step_s", "losses"} to
    spec["result"]. `make_trainer(spec, tokenizer, config_kwargs, callbacks)` builds the trainer
    from the config fields both trainers share."""
    import time

    import torch
    import transformers

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    marks: list[float] = []

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    config = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                  learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, seed=spec["seed"],
                  bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
                  logging_steps=1, max_length=None, dataloader_num_workers=0)
    trainer = make_trainer(spec, tokenizer, config, [Probe()])
    trainer.train()
    trainer.save_model(spec["out"])
    steps = [b - a for a, b in zip(marks[0::2], marks[1::2])]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    Path(spec["result"]).write_text(json.dumps({"step_s": steps, "losses": losses}))


# ---------------------------------------------------------------- data

def prepare(args: argparse.Namespace, env: dict, build_samples: Callable, trl_row: Callable,
            skip_note: str = "") -> dict:
    """Pull the model, turn --data into pairs, keep those `build_samples` fits into --max-length
    and `trl_row` (sample -> TRL's row of token ids, or None with `skip_note` counted) accepts,
    and split them 90/10 by --seed into work-dir/train.jsonl and held.jsonl."""
    from transformers import AutoTokenizer

    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.preferences import read_pairs

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = Path(subprocess.run([VICUNA, "models", "pull", "smollm2-135m-instruct"], env=env, check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    pairs_file = work / "pairs.jsonl"
    subprocess.run([VICUNA, "data", "pairs", str(args.data), "-o", pairs_file, "--overwrite"], env=env, check=True,
                   capture_output=True)
    pairs = read_pairs([str(pairs_file)], Counter())[:getattr(args, "max_pairs", None)]
    tokenizer = AutoTokenizer.from_pretrained(model)
    notes: Counter = Counter()
    samples = build_samples(pairs, tokenizer, template_for_model(tokenizer), args.max_length, notes)
    trl_rows = {}
    for sample in samples:
        row = trl_row(sample)
        if row is None:
            notes[skip_note] += 1
        else:
            trl_rows[sample.id] = row
    kept = [p for p in pairs if p["id"] in trl_rows]
    order = list(range(len(kept)))
    random.Random(args.seed).shuffle(order)
    n_held = round(0.1 * len(kept))
    held = [kept[i] for i in sorted(order[:n_held])]
    train = [kept[i] for i in sorted(order[n_held:])]
    # The held-out tenth is always the whole one; --train-pairs keeps only the training pairs the
    # steps read (one epoch), so neither arm's reference pass runs over pairs it never trains on.
    train = train[:getattr(args, "train_pairs", None)]
    for name, rows in (("train", train), ("held", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_id = {s.id: s for s in samples}
    return {"model": model, "pairs": len(pairs), "fitting": len(kept), "dropped": dict(notes), "train": train,
            "held": held, "held_samples": [by_id[p["id"]] for p in held], "trl_rows": [trl_rows[p["id"]] for p in train]}


# ---------------------------------------------------------------- arms

def vicuna_arm(args: argparse.Namespace, bench: Bench, prep: dict, env: dict, tag: str) -> dict:
    out = args.work_dir / f"vicuna-run{tag}"
    cmd = [VICUNA, "train", bench.method, "-m", prep["model"], "--data", args.work_dir / "train.jsonl", "-o", out,
           "--overwrite", "--max-steps", args.steps, "--global-batch-size", args.batch, "--max-length", args.max_length,
           "--learning-rate", args.lr, "--lr-schedule", "constant", "--warmup-steps", 0, "--seed", args.seed,
           "--log-every", 1, "--device", "cpu", "--precision", "fp32", *bench.vicuna_flags]
    run = measured(cmd, args.work_dir / f"vicuna{tag}.log", env)
    if run["returncode"]:
        sys.exit(f"vicuna arm failed; see {run['log']}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step_s"] for m in metrics if "step_s" in m]
    return {**run, "step_s": steps, "losses": [m["loss"] for m in metrics if "loss" in m], "model_dir": str(out)}


def trl_arm(args: argparse.Namespace, bench: Bench, prep: dict, env: dict, tag: str) -> dict:
    out = args.work_dir / f"trl-run{tag}"
    spec = {"model": str(prep["model"]), "out": str(out), "batch": args.batch, "steps": args.steps, "lr": args.lr,
            "seed": args.seed, **bench.trl_spec, "pairs": prep["trl_rows"],
            "result": str(args.work_dir / f"trl-result{tag}.json")}
    (args.work_dir / f"trl-spec{tag}.json").write_text(json.dumps(spec))
    run = measured([sys.executable, bench.script, "--trl-child", args.work_dir / f"trl-spec{tag}.json"],
                   args.work_dir / f"trl{tag}.log", env)
    if run["returncode"]:
        sys.exit(f"TRL arm failed; see {run['log']}")
    return {**run, **json.loads(Path(spec["result"]).read_text()), "model_dir": str(out)}


def interleaved(args: argparse.Namespace, bench: Bench, prep: dict, env: dict) -> dict[str, dict]:
    """Each arm --rounds times, A B B A ...; per arm: the first round's run with the step times of
    every round after its first step, the largest peak RSS and foreign CPU, and each round's figures."""
    runs: dict[str, list[dict]] = {"vicuna": [], "trl": []}
    for r in range(args.rounds):
        order = ("vicuna", "trl") if r % 2 == 0 else ("trl", "vicuna")
        for name in order:
            runs[name].append((vicuna_arm if name == "vicuna" else trl_arm)(args, bench, prep, env, f"-{r}"))
    # Same seed, data and steps: every round trains the same model; the first one is scored.
    return {name: {**done[0], "step_s": [s for run in done for s in run["step_s"][1:]] or done[0]["step_s"],
                   "peak_rss_mb": max(run["peak_rss_mb"] for run in done),
                   "foreign_cpu": max(run["foreign_cpu"] for run in done),
                   "rounds": [{k: run[k] for k in ("step_s", "peak_rss_mb", "wall_s", "foreign_cpu")} for run in done]}
            for name, done in runs.items()}


# ---------------------------------------------------------------- scoring and report

def bootstrap(values: list[float], rounds: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def longer_answer_wins(held: list[dict]) -> list[float]:
    chars = [(sum(len(m["content"]) for m in p["chosen"]), sum(len(m["content"]) for m in p["rejected"])) for p in held]
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in chars]


def run(args: argparse.Namespace, bench: Bench, prepare_data: Callable[[dict], dict],
        held_out: Callable[[str, dict], list[float]]) -> None:
    """The whole benchmark: `prepare_data(env)` -> prep (see `prepare`); both arms interleaved;
    `held_out(model_dir, prep)` -> 1.0 / 0.0 per held-out pair; tables on stdout; the JSON record."""
    info = machine_info()
    print_machine(info)
    env = dict(os.environ, VICUNA_HOME=str(args.vicuna_home))
    started = dt.datetime.now(dt.timezone.utc)
    prep = prepare_data(env)
    print(f"pairs {prep['pairs']}, fitting {args.max_length} tokens{bench.fit_note}: {prep['fitting']} "
          f"(train {len(prep['train'])}, held out {len(prep['held'])}); dropped {prep['dropped']}", flush=True)
    arms = interleaved(args, bench, prep, env)
    held = prep["held"]
    for arm in arms.values():
        arm["correct"] = held_out(arm["model_dir"], prep)
    rows, figures = [], {}
    for name, values in ((bench.vicuna_name, arms["vicuna"]["correct"]), (bench.trl_name, arms["trl"]["correct"]),
                         ("longer answer wins", longer_answer_wins(held))):
        low, high = bootstrap(values, args.bootstrap, args.seed)
        figures[name] = {"accuracy": sum(values) / len(values), "ci95": [low, high]}
        rows.append((name, f"{sum(values) / len(values):.1%}", f"[{low:.1%}, {high:.1%}]"))
    rows.append(("coin (baseline)", "50.0%", ""))
    timing = {name: {"step_s_median": statistics.median(arm["step_s"]), "peak_rss_mb": arm["peak_rss_mb"],
                     "wall_s": arm["wall_s"], "foreign_cpu": arm["foreign_cpu"], "losses": arm["losses"],
                     "rounds": arm["rounds"]} for name, arm in arms.items()}
    step_ratio = timing["vicuna"]["step_s_median"] / timing["trl"]["step_s_median"]
    rss_ratio = timing["vicuna"]["peak_rss_mb"] / timing["trl"]["peak_rss_mb"]
    trl_low, trl_high = figures[bench.trl_name]["ci95"]
    within = trl_low <= figures[bench.vicuna_name]["accuracy"] <= trl_high
    print()
    print(markdown_table(("arm", "time per step (median)", "peak RSS", "wall", "foreign CPU", "first/last loss"), [
        (name, f"{t['step_s_median']:.2f} s", f"{t['peak_rss_mb']:.0f} MB", f"{t['wall_s']:.0f} s", f"{t['foreign_cpu']:.0%}",
         f"{t['losses'][0]:.3f} / {t['losses'][-1]:.3f}") for name, t in timing.items()]))
    print()
    print(markdown_table(("held-out pairs: " + str(len(held)), bench.metric, "95 % bootstrap interval"), rows))
    print()
    print(markdown_table((bench.goal_title, "measured", ""), [
        ("time per step ≤ 0.5× TRL's", f"{step_ratio:.2f}×", "**pass**" if step_ratio <= 0.5 else "**fail**"),
        (f"peak RSS ≤ {bench.rss_goal}× TRL's", f"{rss_ratio:.2f}×", "**pass**" if rss_ratio <= bench.rss_goal else "**fail**"),
        (f"held-out {bench.metric} within TRL's 95 % interval", f"{figures[bench.vicuna_name]['accuracy']:.1%} in "
         f"[{trl_low:.1%}, {trl_high:.1%}]", "**pass**" if within else "**fail**")]))
    record = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": info,
              "args": {k: str(v) for k, v in vars(args).items()}, "data": {k: prep[k] for k in ("pairs", "fitting", "dropped")},
              "train_pairs": len(prep["train"]), "held_out_pairs": len(held), "timing": timing, "accuracy": figures,
              "ratios": {"step": step_ratio, "peak_rss": rss_ratio}, "vicuna_within_trl_interval": within}
    path = args.record or HERE / "records" / f"bench_{bench.method}-{started:%Y%m%d-%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {path}")
