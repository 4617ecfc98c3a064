"""`vicuna train rm` side by side with TRL's RewardTrainer on HH-RLHF harmless-base.

    python benchmarks/bench_rm.py [--steps 10] [--batch 8] [--max-length 256] [--seed 0] [--rounds 2]
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
trained models (the first round's) are then scored on the held-out pairs by the same code
(vicuna's packed scorer, `vicuna_cli.train.score.RewardModel`), with 95 % bootstrap intervals
(2000 resamples), next to two baselines: a coin (50 %) and "the longer answer wins" (ties count
one half). What this shares with bench_dpo.py lives in _pairs_vs_trl.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pairs_vs_trl as pairs_vs_trl  # noqa: E402


def make_trainer(spec: dict, tokenizer, config: dict, callbacks: list):
    import torch
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = transformers.AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardTrainer(model=model, args=RewardConfig(**config), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(spec["pairs"]), callbacks=callbacks)


def trl_row(sample) -> dict:
    return {"chosen_ids": sample.chosen, "rejected_ids": sample.rejected}


def prepare(args, env: dict) -> dict:
    from vicuna_cli.train.rm import build_pair_samples

    return pairs_vs_trl.prepare(args, env, build_pair_samples, trl_row)


def held_out(model_dir: str, held: list[dict], env_home: str) -> list[float]:
    """1.0 / 0.0 per held-out pair: does the model score chosen above rejected?"""
    os.environ["VICUNA_HOME"] = env_home
    from vicuna_cli.train.score import RewardModel

    model = RewardModel(model_dir, "cpu", None)
    sequences = model.encode([p["prompt"] + p[side] for p in held for side in ("chosen", "rejected")])
    scores = model.score(sequences, 4096)
    return [float(scores[2 * k] > scores[2 * k + 1]) for k in range(len(held))]


def main() -> None:
    if sys.argv[1:2] == ["--trl-child"]:
        return pairs_vs_trl.trl_child(sys.argv[2], make_trainer)
    args = pairs_vs_trl.parser(__doc__, "rm", lr=1e-5).parse_args()
    bench = pairs_vs_trl.Bench(method="rm", script=__file__, trl_name="TRL RewardTrainer", metric="accuracy",
                               goal_title="goal", rss_goal=0.7)
    pairs_vs_trl.run(args, bench, lambda env: prepare(args, env),
                     lambda model_dir, prep: held_out(model_dir, prep["held"], str(args.vicuna_home)))


if __name__ == "__main__":
    main()
