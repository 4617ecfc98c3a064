"""Whole PPO step: `vicuna train ppo` vs a plain-PyTorch PPO step written the way TRL's PPOTrainer
(v0.x, `AutoModelForCausalLMWithValueHead`, the trainer StableVicuna-era TRL shipped) did it.

    python benchmarks/bench_ppo_step.py --reward-model RM_DIR --prompts PAIRS.jsonl [--batch 8]
        [--new-tokens 32] [--ppo-epochs 4] [--steps 3] [--rounds 2] [--max-length 256]
        [--work-dir /tmp/bench_ppo_step] [--record OUT.json]

Why a hand-written reference: the installed TRL (1.16) ships no PPO trainer (neither
`trl.trainer` nor `trl.experimental`), and an older TRL needs transformers 4.x. The reference step
does what TRL v0's `PPOTrainer.generate` + `step` did, on the same model, prompts, batch, PPO
epochs, learning rate and seed: rollouts with `model.generate(do_sample=True)` on the left-padded
batch; the reward model scores each padded prompt+answer; `batched_forward_pass` of the policy
(logits and the value head on the last hidden state) and of a frozen reference copy over the
padded batch; per-token rewards = -kl_coef * (logp - ref_logp), plus the score on the last answer
token; GAE (gamma 1, lam 0.95) and whitened advantages; --ppo-epochs passes, each one padded
forward + clipped policy and value losses + backward + AdamW step (the whole batch as one
mini-batch, as vicuna's default). vicuna: `vicuna train ppo` with the same settings (its
metrics.jsonl step_s). One thread each (OMP_NUM_THREADS), arms rotated round by round.

Precision: the reference runs fp32 (TRL v0's default: accelerate without mixed precision) and, as a
third arm, bf16 autocast around every forward, generate and loss (what `mixed_precision="bf16"`
would do), so both "defaults vs defaults" and "same precision" ratios come out of one run. vicuna
runs its --precision (default auto: bf16 mixed precision on a CPU with native bf16).
Time per step: median over every round's steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, print_machine  # noqa: E402
from bench_train import measured  # noqa: E402

VICUNA = Path(sys.executable).parent / "vicuna"


def reference_child(spec_path: str) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from vicuna_cli.train.ppo import PpoConfig, build

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = PpoConfig(model=spec["model"], prompts=[spec["prompts"]], max_length=spec["max_length"],
                       max_new_tokens=spec["new_tokens"])
    prompts = [s.ids for s in build(config, tokenizer)[0]]
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
    rm = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], dtype=torch.float32).eval()
    v_head = torch.nn.Linear(policy.config.hidden_size, 1)
    optimizer = torch.optim.AdamW([*policy.parameters(), *v_head.parameters()], lr=spec["lr"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = policy.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    kl_coef, cliprange, cliprange_value, gamma, lam = 0.05, 0.2, 0.2, 1.0, 0.95

    def forward(model, ids, mask, with_values):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=with_values)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        values = v_head(out.hidden_states[-1][:, :-1]).squeeze(-1) if with_values else None
        return logp, values

    def step(batch: list[list[int]]) -> dict:
        width = max(map(len, batch))
        query = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        qmask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        policy.eval()
        with torch.no_grad(), autocast:
            out = policy.generate(input_ids=query, attention_mask=qmask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=spec["new_tokens"], pad_token_id=pad)
        response = out[:, width:]
        rmask = torch.ones_like(response)
        for b, row in enumerate(response.tolist()):  # answer tokens up to and including the stop token
            for t, token in enumerate(row):
                if token in stops:
                    rmask[b, t + 1:] = 0
                    break
        ids, mask = out, torch.cat([qmask, rmask], 1)
        act = mask[:, width:].float()  # the answer tokens: positions width.. predicted from width-1..
        with torch.no_grad(), autocast:
            scores = rm(input_ids=ids, attention_mask=mask).logits[:, 0].float()
            logp, values = forward(policy, ids, mask, True)
            ref_logp, _ = forward(ref, ids, mask, False)
            values = values.float()
            logp, values, ref_logp = logp[:, width - 1:], values[:, width - 1:], ref_logp[:, width - 1:]
            rewards = -kl_coef * (logp - ref_logp) * act
            rewards[torch.arange(len(batch)), act.sum(1).long() - 1] += scores
            advantages, last_gae, length = torch.zeros_like(rewards), 0.0, rewards.shape[1]
            for t in reversed(range(length)):  # GAE, TRL's compute_advantages
                follows = act[:, t + 1] if t + 1 < length else torch.zeros(len(batch))
                next_value = values[:, t + 1] * follows if t + 1 < length else 0.0
                delta = rewards[:, t] + gamma * next_value - values[:, t]
                last_gae = delta + gamma * lam * last_gae * follows
                advantages[:, t] = last_gae
            returns = advantages + values
            mean = (advantages * act).sum() / act.sum()
            var = (((advantages - mean) ** 2) * act).sum() / act.sum()
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * act
        policy.train()
        for _ in range(spec["ppo_epochs"]):
            with autocast:
                new_logp, new_values = forward(policy, ids, mask, True)
            new_logp, new_values = new_logp[:, width - 1:], new_values[:, width - 1:].float()
            ratio = torch.exp(new_logp - logp)
            pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
            vclip = values + (new_values - values).clamp(-cliprange_value, cliprange_value)
            vf = 0.5 * torch.max((new_values - returns) ** 2, (vclip - returns) ** 2)
            loss = ((pg + vf) * act).sum() / act.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*policy.parameters(), *v_head.parameters()], 1.0)
            optimizer.step()
        return {"reward": float(scores.mean()), "answer_tokens": float(act.sum(1).mean())}

    steps = []
    for k in range(spec["steps"]):
        started = time.perf_counter()
        figures = step(prompts[k * spec["batch"]:(k + 1) * spec["batch"]])
        steps.append({"step": k + 1, "step_s": time.perf_counter() - started, **figures})
        print(json.dumps(steps[-1]), flush=True)
    Path(spec["result"]).write_text(json.dumps(steps))


def main() -> None:
    if sys.argv[1:2] == ["--reference-child"]:
        return reference_child(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout-dtype", default="auto", help="vicuna's --rollout-dtype")
    parser.add_argument("--precision", default="auto", help="vicuna's --precision")
    parser.add_argument("--reference-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="one reference arm per precision")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_ppo_step"))
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    model = args.model or Path(__import__("subprocess").run([VICUNA, "models", "pull", "smollm2-135m-instruct"], env=env,
                                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    # Exactly steps x batch prompts that fit, so both arms answer the same prompts (each in its own order).
    from transformers import AutoTokenizer

    from vicuna_cli.train.ppo import PpoConfig, build
    config = PpoConfig(model=str(model), prompts=[args.prompts], max_length=args.max_length, max_new_tokens=args.new_tokens)
    fitting = build(config, AutoTokenizer.from_pretrained(model))[0][:args.steps * args.batch]
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    lines = [json.dumps({"id": s.id, "conversations": [{"from": role[m["role"]], "value": m["content"]} for m in s.messages]})
             for s in fitting]
    prompts = work / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")

    def vicuna(tag: str) -> dict:
        out = work / f"vicuna{tag}"
        cmd = [VICUNA, "train", "ppo", "-m", model, "--reward-model", args.reward_model, "--prompts", prompts, "-o", out,
               "--overwrite", "--max-steps", args.steps, "--rollout-batch-size", args.batch, "--max-new-tokens", args.new_tokens,
               "--ppo-epochs", args.ppo_epochs, "--max-length", args.max_length, "--learning-rate", args.lr, "--seed", args.seed,
               "--log-every", 1, "--log-samples", 0, "--device", "cpu", "--precision", args.precision, "--rollout-dtype", args.rollout_dtype]
        run = measured(cmd, work / f"vicuna{tag}.log", env)
        if run["returncode"]:
            sys.exit(f"vicuna arm failed; see {run['log']}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {**run, "steps": [m for m in metrics if "step_s" in m]}

    def reference(tag: str, precision: str) -> dict:
        tag = f"-{precision}{tag}"
        spec = {"precision": precision, "model": str(model), "reward_model": args.reward_model, "prompts": str(prompts), "max_length": args.max_length,
                "new_tokens": args.new_tokens, "batch": args.batch, "steps": args.steps, "ppo_epochs": args.ppo_epochs,
                "lr": args.lr, "seed": args.seed, "result": str(work / f"reference{tag}.json")}
        (work / f"spec{tag}.json").write_text(json.dumps(spec))
        run = measured([sys.executable, __file__, "--reference-child", work / f"spec{tag}.json"], work / f"reference{tag}.log", env)
        if run["returncode"]:
            sys.exit(f"reference arm failed; see {run['log']}")
        return {**run, "steps": json.loads(Path(spec["result"]).read_text())}

    arms = ["vicuna", *(f"reference-{p}" for p in args.reference_precisions)]
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name in arms[r % len(arms):] + arms[:r % len(arms)]:  # rotated: each arm meets each load
            runs[name].append(vicuna(f"-{r}") if name == "vicuna" else reference(f"-{r}", name.split("-")[1]))
            print(f"round {r + 1} {name}: " + ", ".join(f"{s['step_s']:.1f}" for s in runs[name][-1]["steps"]) + " s/step",
                  flush=True)
    timing = {name: {"step_s_median": statistics.median(s["step_s"] for run in done for s in run["steps"][1:]),
                     "rounds": [[s["step_s"] for s in run["steps"]] for run in done],
                     "peak_rss_mb": max(run["peak_rss_mb"] for run in done),
                     "foreign_cpu": max(run["foreign_cpu"] for run in done),
                     "answer_tokens": [s.get("answer_tokens") for run in done for s in run["steps"]]}
              for name, done in runs.items()}
    ratios = {name: timing["vicuna"]["step_s_median"] / timing[name]["step_s_median"] for name in arms[1:]}
    print(markdown_table(("arm", "time per step (median, steps 2+)", "per round", "peak RSS", "foreign CPU"), [
        (name, f"{t['step_s_median']:.1f} s", " / ".join(", ".join(f"{x:.1f}" for x in r) for r in t["rounds"]),
         f"{t['peak_rss_mb']:.0f} MB", f"{t['foreign_cpu']:.0%}") for name, t in timing.items()]))
    for name, ratio in ratios.items():
        print(f"vicuna / {name}: {ratio:.2f}x (goal <= 0.5x: {'met' if ratio <= 0.5 else 'not met'})")
    record = {"command": " ".join(sys.argv), "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
              "timing": timing, "ratios": ratios}
    path = args.record or Path(__file__).resolve().parent / "records" / f"bench_ppo_step-{time.strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
