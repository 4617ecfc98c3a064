"""PPO rollout generation: vicuna's batch engine (what `train ppo` samples with) vs transformers'
`model.generate` (what TRL's PPO trainer samples with), on the same prompts, batch and model.

    python benchmarks/bench_ppo.py [--model smollm2-135m-instruct] [--batch 8] [--new-tokens 64]
                                   [--repeats 3] [--json OUT]

All arms sample at temperature 1 from the SAME in-memory policy (an AutoModelForCausalLM in
fp32, as `train ppo` holds it): vicuna through `train/rollout.generate` (a native model built
over the policy's own tensors at every call, as each PPO step does, then continuous batching;
once on the shared fp32 tensors as `--rollout-dtype fp32` does, once on a bf16 copy as the default
`--rollout-dtype auto` makes on a CPU with native bf16),
transformers through `model.generate(do_sample=True)` on the left-padded batch. Arms alternate
A B A B ... (`--repeats` rounds, machine noise hits both); tokens/s counts the answer tokens each
arm produced (up to and including EOS) over its wall time. Goal: vicuna >= 3x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, machine_info, markdown_table, print_machine, summary, write_results  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?",
    "Explain photosynthesis in one paragraph.", "Give me three tips for a job interview.",
    "What is 17 times 23?", "Tell me a short story about a robot.", "Why is the sky blue?",
    "Translate 'good morning' into Spanish.", "What are the planets of the solar system?",
    "Summarise the plot of Hamlet.", "How does a bicycle stay upright?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna_cli.core import models
    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.train.rollout import generate

    info = machine_info()
    print_machine(info)
    path = models.resolve(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    template = template_for_model(tokenizer, None)
    prompts = []
    for k in range(args.batch):
        text = template.prompt_text([{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}], add_generation_prompt=True)
        prompts.append(list(tokenizer(text, add_special_tokens=template.name != "auto")["input_ids"]))
    context = max(map(len, prompts)) + args.new_tokens + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = policy.generation_config.eos_token_id

    def vicuna(dtype: Any) -> Callable[[int], tuple[int, float]]:
        def arm(round_: int) -> tuple[int, float]:
            seeds = [args.seed * 1000 + round_ * 100 + k for k in range(len(prompts))]
            answers, seconds, engine = generate(policy, tokenizer, prompts, seeds, args.new_tokens, context,
                                                len(prompts), dtype=dtype)
            if engine != "native" and round_ == 0:
                print(f"note: vicuna arm on the {engine} path")
            return sum(len(a.ids) for a in answers), seconds
        return arm

    def hf_generate(round_: int) -> tuple[int, float]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(args.seed * 1000 + round_)
        started = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=args.new_tokens, pad_token_id=pad)
        seconds = time.perf_counter() - started
        stops = set(eos if isinstance(eos, list) else [eos])
        tokens = 0
        for row in out[:, width:].tolist():
            for t in row:
                tokens += 1
                if t in stops:
                    break
        return tokens, seconds

    arms = {"vicuna engine (fp32, the policy dtype: --rollout-dtype fp32)": vicuna(None),
            "vicuna engine (bf16 copy: --rollout-dtype auto on a CPU with native bf16)": vicuna(torch.bfloat16),
            "model.generate": hf_generate}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(args.repeats):
        for name, arm in arms.items():
            tokens, seconds = arm(round_)
            rates[name].append(tokens / seconds)
            print(f"round {round_ + 1} · {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s", flush=True)
    ratios = {name: [a / b for a, b in zip(rates[name], rates["model.generate"])] for name in rates if name != "model.generate"}
    rows = [[name, f"{summary(v)['median']:.1f}", f"{min(v):.1f}–{max(v):.1f}"] for name, v in rates.items()]
    print(markdown_table(["arm", "tok/s (median)", "range"], rows))
    for name, values in ratios.items():
        print(f"{name} / model.generate per round: {', '.join(f'{r:.2f}' for r in values)}; "
              f"median {summary(values)['median']:.2f}x")
    write_results("ppo_rollouts", {"machine": info, "args": vars(args), "tokens_per_s": rates, "ratios": ratios}, args.json)


if __name__ == "__main__":
    main()
