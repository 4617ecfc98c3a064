"""`vicuna train dpo` side by side with TRL's DPOTrainer on HH-RLHF harmless-base.

    python benchmarks/bench_dpo.py [--steps 10] [--batch 8] [--max-length 256] [--seed 0] [--rounds 2]
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

Each arm runs in a fresh process, A B B A ... for --rounds rounds (the order flips each round, so
a neighbour's load falls on both); time per step is the median over every round's steps after
the first (the reference pass is outside the steps of both; it is in the wall time); peak RSS is
the largest of the rounds' high-water marks (bench_train.measured). Both trained policies (the
first round's) are then scored on the held-out pairs by the same code (vicuna's `sequence_logps`,
the start model as the reference): a pair is right when its implicit reward margin
β·(Δ_chosen − Δ_rejected) is > 0. 95 % bootstrap intervals (2000 resamples), next to "the longer
answer wins" and a coin. What this shares with bench_rm.py lives in _pairs_vs_trl.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pairs_vs_trl as pairs_vs_trl  # noqa: E402


def make_trainer(spec: dict, tokenizer, config: dict, callbacks: list):
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    # The data is already tokenized by vicuna (same ids in both arms): skip TRL's chat-template pass.
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    args = DPOConfig(**config, beta=spec["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=spec["precompute"])
    return DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(spec["pairs"]),
                      callbacks=callbacks)


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


def prepare(args, env: dict) -> dict:
    from vicuna_cli.train.dpo import build_dpo_samples

    return pairs_vs_trl.prepare(args, env, build_dpo_samples, one_turn, "answer is more than one turn")


_start_logps: dict = {}  # the start model's held-out log-probs, computed once for both arms


def held_out(model_dir: str, start_model: str, samples: list, beta: float) -> list[float]:
    """1.0 / 0.0 per held-out pair: is the trained policy's implicit reward margin positive?"""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna_cli.train.dpo import collate, sequence_logps

    def logps(path: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.cat([sequence_logps(model, collate(samples[i:i + 8], True, 0)) for i in range(0, len(samples), 8)])

    if start_model not in _start_logps:
        _start_logps[start_model] = logps(start_model)
    ratio = logps(model_dir) - _start_logps[start_model]
    margins = beta * (ratio[0::2] - ratio[1::2])
    return [float(m > 0) for m in margins]


def main() -> None:
    if sys.argv[1:2] == ["--trl-child"]:
        return pairs_vs_trl.trl_child(sys.argv[2], make_trainer)
    parser = pairs_vs_trl.parser(__doc__, "dpo", lr=5e-6)
    parser.add_argument("--max-pairs", type=int, default=None, help="Use the first N pairs only (smoke runs).")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--no-precompute", action="store_true", help="Both arms keep a frozen reference in memory.")
    args = parser.parse_args()
    bench = pairs_vs_trl.Bench(method="dpo", script=__file__, trl_name="TRL DPOTrainer", metric="reward accuracy",
                               goal_title="goal (issue #14)", rss_goal=0.6, fit_note=" with one-turn answers",
                               vicuna_flags=("--beta", args.beta, "--loss", "sigmoid",
                                             *(["--no-precompute"] if args.no_precompute else [])),
                               trl_spec={"beta": args.beta, "precompute": not args.no_precompute})
    pairs_vs_trl.run(args, bench, lambda env: prepare(args, env),
                     lambda model_dir, prep: held_out(model_dir, str(prep["model"]), prep["held_samples"], args.beta))


if __name__ == "__main__":
    main()
