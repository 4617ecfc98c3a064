"""`vicuna train dpo` side by side with TRL's DPOTrainer on HH-RLHF harmless-base.

    python benchmarks/bench_dpo.py [--steps 10] [--batch 8] [--max-length 256] [--seed 0]
                                   [--max-pairs N] [--work-dir /tmp/bench_dpo] [--vicuna-home /tmp/vh]

Data: ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz through `vicuna data pairs`, pairs whose
two sides fit --max-length tokens with the embedded SmolLM2-135M-Instruct's chat template and whose
answer is one assistant turn (TRL's completion is one contiguous span), split 90/10 by --seed.
Both arms start from the same weights (the embedded model converted to safetensors), see the same
tokens (TRL gets the prompt/chosen/rejected token ids vicuna renders; its own tokenization step is
bypassed), and run the same optimizer steps of --batch pairs: sigmoid loss, beta --beta, AdamW at
the same constant learning rate without warmup, fp32, no gradient checkpointing, seed --seed.
Both precompute the reference log-probs before training (TRL: `precompute_ref_log_probs=True`;
`--no-precompute` keeps a frozen reference copy in both arms instead):

- vicuna: `vicuna train dpo` (a pair's two sequences packed into rows of 2 x --max-length tokens);
- TRL: `DPOTrainer` (one padded batch of 2 x --batch sequences per step), in a child process of
  this script with a callback that times each optimizer step.

Each arm runs in a fresh process (vicuna first, then TRL); time per step is the median over the
steps after the first (the reference pass is outside the steps of both; it is in the wall time);
peak RSS is the child's high-water mark (bench_train.measured). Both trained policies are then
scored on the held-out pairs by the same code (vicuna's `sequence_logps`, the start model as the
reference): a pair is right when its implicit reward margin β·(Δ_chosen − Δ_rejected) is > 0.
95 % bootstrap intervals (2000 resamples), next to "the longer answer wins" and a coin.
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
        from trl import DPOConfig, DPOTrainer

        spec = json.loads(open(spec_path).read())
        torch.manual_seed(spec["seed"])
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        marks: list[float] = []

        class Probe(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                marks.append(time.perf_counter())

        # The data is already tokenized by vicuna (same ids in both arms): skip TRL's chat-template pass.
        DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
        args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                         learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, seed=spec["seed"],
                         beta=spec["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=spec["precompute"],
                         bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
                         logging_steps=1, max_length=None, dataloader_num_workers=0)
        data = Dataset.from_list(spec["pairs"])
        trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data, callbacks=[Probe()])
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
from bench_rm import bootstrap  # noqa: E402
from bench_train import measured  # noqa: E402

HH = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
VICUNA = Path(sys.executable).parent / "vicuna"


def one_turn(sample) -> dict | None:
    """TRL's {prompt_ids, chosen_ids, rejected_ids} for a pair whose answers are one contiguous
    span of answer tokens after the same prompt tokens, else None."""
    from vicuna_cli.train.labels import IGNORE

    parts = []
    for ids, labels in sample.sides():
        scored = [i for i, label in enumerate(labels) if label != IGNORE]
        if scored != list(range(scored[0], scored[-1] + 1)):
            return None
        parts.append((ids[:scored[0]], ids[scored[0]:scored[-1] + 1]))
    (prompt, chosen), (prompt_r, rejected) = parts
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected} if prompt == prompt_r else None


def prepare(args: argparse.Namespace, env: dict) -> dict:
    from transformers import AutoTokenizer

    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.preferences import read_pairs
    from vicuna_cli.train.dpo import build_dpo_samples

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = Path(subprocess.run([VICUNA, "models", "pull", "smollm2-135m-instruct"], env=env, check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    pairs_file = work / "pairs.jsonl"
    subprocess.run([VICUNA, "data", "pairs", str(args.data), "-o", pairs_file, "--overwrite"], env=env, check=True,
                   capture_output=True)
    pairs = read_pairs([str(pairs_file)], Counter())[:args.max_pairs]
    tokenizer = AutoTokenizer.from_pretrained(model)
    notes: Counter = Counter()
    samples = build_dpo_samples(pairs, tokenizer, template_for_model(tokenizer), args.max_length, notes)
    trl_rows = {}
    for sample in samples:
        row = one_turn(sample)
        if row is None:
            notes["answer is more than one turn"] += 1
        else:
            trl_rows[sample.id] = row
    kept = [p for p in pairs if p["id"] in trl_rows]
    order = list(range(len(kept)))
    random.Random(args.seed).shuffle(order)
    n_held = round(0.1 * len(kept))
    held = [kept[i] for i in sorted(order[:n_held])]
    train = [kept[i] for i in sorted(order[n_held:])]
    for name, rows in (("train", train), ("held", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_id = {s.id: s for s in samples}
    return {"model": model, "pairs": len(pairs), "fitting": len(kept), "dropped": dict(notes), "train": train,
            "held": held, "held_samples": [by_id[p["id"]] for p in held], "trl_rows": [trl_rows[p["id"]] for p in train]}


def vicuna_arm(args: argparse.Namespace, prep: dict, env: dict) -> dict:
    out = args.work_dir / "vicuna-run"
    cmd = [VICUNA, "train", "dpo", "-m", prep["model"], "--data", args.work_dir / "train.jsonl", "-o", out, "--overwrite",
           "--max-steps", args.steps, "--global-batch-size", args.batch, "--max-length", args.max_length,
           "--learning-rate", args.lr, "--lr-schedule", "constant", "--warmup-steps", 0, "--seed", args.seed,
           "--beta", args.beta, "--loss", "sigmoid", "--log-every", 1, "--device", "cpu", "--precision", "fp32"]
    if args.no_precompute:
        cmd.append("--no-precompute")
    run = measured(cmd, args.work_dir / "vicuna.log", env)
    if run["returncode"]:
        sys.exit(f"vicuna arm failed; see {run['log']}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step_s"] for m in metrics if "step_s" in m]
    return {**run, "step_s": steps, "losses": [m["loss"] for m in metrics if "loss" in m], "model_dir": str(out)}


def trl_arm(args: argparse.Namespace, prep: dict, env: dict) -> dict:
    out = args.work_dir / "trl-run"
    spec = {"model": str(prep["model"]), "out": str(out), "batch": args.batch, "steps": args.steps, "lr": args.lr,
            "seed": args.seed, "beta": args.beta, "precompute": not args.no_precompute, "pairs": prep["trl_rows"],
            "result": str(args.work_dir / "trl-result.json")}
    (args.work_dir / "trl-spec.json").write_text(json.dumps(spec))
    run = measured([sys.executable, __file__, "--trl-child", args.work_dir / "trl-spec.json"], args.work_dir / "trl.log", env)
    if run["returncode"]:
        sys.exit(f"TRL arm failed; see {run['log']}")
    return {**run, **json.loads(Path(spec["result"]).read_text()), "model_dir": str(out)}


def held_out(model_dir: str, start_model: str, samples: list, beta: float) -> list[float]:
    """1.0 / 0.0 per held-out pair: is the trained policy's implicit reward margin positive?"""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna_cli.train.dpo import collate, sequence_logps

    def logps(path: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.cat([sequence_logps(model, collate(samples[i:i + 8], True, 0)) for i in range(0, len(samples), 8)])

    ratio = logps(model_dir) - logps(start_model)
    margins = beta * (ratio[0::2] - ratio[1::2])
    return [float(m > 0) for m in margins]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HH)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-pairs", type=int, default=None, help="Use the first N pairs only (smoke runs).")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-precompute", action="store_true", help="Both arms keep a frozen reference in memory.")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_dpo"))
    parser.add_argument("--vicuna-home", type=Path, default=Path(os.environ.get("VICUNA_HOME", "/tmp/vh")))
    parser.add_argument("--record", type=Path, default=None, help="JSON record path (default benchmarks/records/bench_dpo-DATE.json)")
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    env = dict(os.environ, VICUNA_HOME=str(args.vicuna_home))
    started = dt.datetime.now(dt.timezone.utc)
    prep = prepare(args, env)
    print(f"pairs {prep['pairs']}, fitting {args.max_length} tokens with one-turn answers: {prep['fitting']} "
          f"(train {len(prep['train'])}, held out {len(prep['held'])}); dropped {prep['dropped']}", flush=True)
    arms = {"vicuna": vicuna_arm(args, prep, env), "trl": trl_arm(args, prep, env)}
    held = prep["held"]
    for arm in arms.values():
        arm["correct"] = held_out(arm["model_dir"], str(prep["model"]), prep["held_samples"], args.beta)
    chars = [(sum(len(m["content"]) for m in p["chosen"]), sum(len(m["content"]) for m in p["rejected"])) for p in held]
    longer = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in chars]
    rows, figures = [], {}
    for name, values in (("vicuna train dpo", arms["vicuna"]["correct"]), ("TRL DPOTrainer", arms["trl"]["correct"]),
                         ("longer answer wins", longer)):
        low, high = bootstrap(values, args.bootstrap, args.seed)
        figures[name] = {"accuracy": sum(values) / len(values), "ci95": [low, high]}
        rows.append((name, f"{sum(values) / len(values):.1%}", f"[{low:.1%}, {high:.1%}]"))
    rows.append(("coin (baseline)", "50.0%", ""))
    timing = {}
    for name, arm in arms.items():
        timed = arm["step_s"][1:] or arm["step_s"]
        timing[name] = {"step_s_median": statistics.median(timed), "peak_rss_mb": arm["peak_rss_mb"],
                        "wall_s": arm["wall_s"], "foreign_cpu": arm["foreign_cpu"], "losses": arm["losses"]}
    step_ratio = timing["vicuna"]["step_s_median"] / timing["trl"]["step_s_median"]
    rss_ratio = timing["vicuna"]["peak_rss_mb"] / timing["trl"]["peak_rss_mb"]
    trl_low, trl_high = figures["TRL DPOTrainer"]["ci95"]
    within = trl_low <= figures["vicuna train dpo"]["accuracy"] <= trl_high
    print()
    print(markdown_table(("arm", "time per step (median)", "peak RSS", "wall", "foreign CPU", "first/last loss"), [
        (name, f"{t['step_s_median']:.2f} s", f"{t['peak_rss_mb']:.0f} MB", f"{t['wall_s']:.0f} s", f"{t['foreign_cpu']:.0%}",
         f"{t['losses'][0]:.3f} / {t['losses'][-1]:.3f}") for name, t in timing.items()]))
    print()
    print(markdown_table(("held-out pairs: " + str(len(held)), "reward accuracy", "95 % bootstrap interval"), rows))
    print()
    print(markdown_table(("goal (issue #14)", "measured", ""), [
        ("time per step ≤ 0.5× TRL's", f"{step_ratio:.2f}×", "**pass**" if step_ratio <= 0.5 else "**fail**"),
        ("peak RSS ≤ 0.6× TRL's", f"{rss_ratio:.2f}×", "**pass**" if rss_ratio <= 0.6 else "**fail**"),
        ("held-out reward accuracy within TRL's 95 % interval", f"{figures['vicuna train dpo']['accuracy']:.1%} in "
         f"[{trl_low:.1%}, {trl_high:.1%}]", "**pass**" if within else "**fail**")]))
    record = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": info,
              "args": {k: str(v) for k, v in vars(args).items()}, "data": {k: prep[k] for k in ("pairs", "fitting", "dropped")},
              "train_pairs": len(prep["train"]), "held_out_pairs": len(held), "timing": timing, "accuracy": figures,
              "ratios": {"step": step_ratio, "peak_rss": rss_ratio}, "vicuna_within_trl_interval": within}
    path = args.record or HERE / "records" / f"bench_dpo-{started:%Y%m%d-%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {path}")


if __name__ == "__main__":
    main()
