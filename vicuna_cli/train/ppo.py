"""`vicuna train ppo`: RLHF against a reward model (StableVicuna stage 3, as trlX ran it), as a
method of the loop, run dir, checkpoints, resume and kernels of `train sft` (sft.run_training).

A loop step is one rollout batch: `--rollout-batch-size` prompts (the plan of the shared loop:
a seeded shuffle per epoch, so the prompt position is the trainer state's) are answered by the
project's engine at the policy's current weights (rollout.py), scored by the reward model on the
whole answer, and turned into per-token rewards (the score minus the KL penalty to the frozen
reference), values, GAE advantages and returns (ppo_math.py). The step then runs `--ppo-epochs`
passes over the rollouts in mini-batches, each one optimizer update of the shared loop (packed
rows, the loop's normalisation over answer tokens, clipping, NaN/inf skipping). The value head is
a linear layer on the policy's last hidden state, trained with it and kept in the checkpoints;
the run dir holds the policy alone (an HF model dir, or `adapter/` with --lora).

The reference is a frozen copy of the SFT model, or with --lora the base with the adapter
disabled (no copy). The KL controller and the running score moments are the session's state,
written as JSON into every checkpoint, so `--resume auto` continues the same run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.errors import VicunaError
from .config import PpoConfig  # noqa: F401  (imported from here)
from .modeling import causal_lm
from .ppo_math import policy_loss, value_loss

SAMPLES = "samples.jsonl"
# (prompts' messages, answers' texts, answers' token ids) -> one score per answer
RewardFn = Callable[[list, list, list], Sequence[float]]




@dataclass(frozen=True)
class PromptSample:
    id: str
    messages: list[dict[str, str]]
    ids: list[int]
    n_supervised = 1  # the plan's unit is a prompt

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Rollout:
    """One answered prompt, ready for the losses: per answer token its old log-prob and value,
    advantage and return."""

    ids: list[int]  # prompt + answer
    prompt_length: int
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def n_supervised(self) -> int:
        return len(self.ids) - self.prompt_length

    def __len__(self) -> int:
        return len(self.ids)


def read_prompts(paths: Sequence[str], notes: Counter) -> list[tuple[str, list[dict[str, str]]]]:
    """(id, messages ending with a user turn) from pairwise files (the pair's prompt: HH-RLHF's
    dialogue before the rated answer) or conversation files (the turns before the last answer; a
    record of user turns only is a prompt as it is). Repeated prompts are kept once."""
    from ..data.formats import InputFile, Skip, to_sharegpt
    from ..data.mix import detect_kind
    from ..data.preferences import read_pairs
    from ..data.split import to_messages

    found: list[tuple[str, list[dict[str, str]]]] = []
    for path in paths:
        if not Path(path).is_file():
            raise VicunaError(f"--prompts {path}: no such file")
        if detect_kind(path) == "pairs":
            found += [(pair["id"], list(pair["prompt"])) for pair in read_pairs([path], notes)]
            continue
        source = InputFile(path)
        try:
            for raw in source.conversation_records():
                try:
                    record = to_sharegpt(raw, source.format)
                except Skip as exc:
                    notes[exc.reason] += 1
                    continue
                messages = to_messages(record["conversations"])
                while messages and messages[-1]["role"] == "assistant":
                    messages.pop()
                if any(m["role"] == "user" for m in messages):
                    found.append((record["id"], messages))
                else:
                    notes["no user turn"] += 1
        finally:
            source.close()
    unique, seen = [], set()
    for pid, messages in found:
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            notes["repeated prompt (kept once)"] += 1
        else:
            seen.add(key)
            unique.append((pid, messages))
    return unique


def build(config: PpoConfig, tokenizer: Any) -> tuple[list, list, Counter, str]:
    from ..core.encoding import encode_prompt
    from ..core.templates import template_for_model

    if not config.prompts:
        raise VicunaError("no prompts: pass --prompts FILE (conversations, or preference pairs such as HH-RLHF)")
    template = template_for_model(tokenizer, config.template)
    notes: Counter = Counter()
    room = config.max_length - config.max_new_tokens
    samples = []
    for pid, messages in read_prompts(config.prompts, notes):
        try:  # the template checks the turns; one odd prompt (HH-RLHF has a few) must not stop the run
            ids = encode_prompt(tokenizer, template, messages).ids  # as chat and serve encode it
        except VicunaError:
            notes["turns do not alternate user/assistant (skipped)"] += 1
            continue
        if len(ids) > room:
            notes["prompt longer than --max-length minus --max-new-tokens (skipped)"] += 1
        elif ids:
            samples.append(PromptSample(pid, messages, ids))
    if not samples:
        raise VicunaError(f"no usable prompt ({', '.join(f'{k}: {v}' for k, v in sorted(notes.items())) or 'none read'})",
                          hint=f"raise --max-length or lower --max-new-tokens (room for a prompt now: {room} tokens)")
    return samples, [], notes, template.name


def collate(samples: Sequence[Rollout], packing: bool, pad_id: int) -> dict[str, Any]:
    """Rollouts as one packed row (positions restart per sequence) or padded rows; `index` is the
    (row, column) of each position whose next-token distribution chose an answer token."""
    if not samples:  # an empty micro-batch keeps the ranks in step with a zero loss
        empty = torch.zeros(0)
        return {"input_ids": torch.tensor([[pad_id]]), "position_ids": torch.tensor([[0]]),
                "index": torch.zeros(0, 2, dtype=torch.long), "actions": torch.zeros(0, dtype=torch.long),
                "old_logprobs": empty, "old_values": empty, "advantages": empty, "returns": empty}
    index, at = [], 0
    for row, s in enumerate(samples):
        offset, row = (at, 0) if packing else (0, row)
        index += [[row, offset + p] for p in range(s.prompt_length - 1, len(s) - 1)]
        at += len(s)
    out: dict[str, Any] = {
        "index": torch.tensor(index), "actions": torch.tensor([t for s in samples for t in s.ids[s.prompt_length:]]),
        **{key: torch.cat([getattr(s, key) for s in samples]).float()
           for key in ("old_logprobs", "old_values", "advantages", "returns")}}
    if packing:
        out["input_ids"] = torch.tensor([[t for s in samples for t in s.ids]])
        out["position_ids"] = torch.tensor([[p for s in samples for p in range(len(s))]])
        return out
    width = max(len(s) for s in samples)
    out["input_ids"] = torch.tensor([s.ids + [pad_id] * (width - len(s)) for s in samples])
    out["attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in samples])
    out["position_ids"] = torch.arange(width).expand(len(samples), -1).clone()
    return out


def answer_tokens(samples: Sequence[Any]) -> int:
    return sum(s.n_supervised for s in samples)


def policy_outputs(model: Any, v_head: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob of each answer token, value before it, entropy of the distribution it came from)."""
    lm = causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    index = batch["index"]
    h = hidden[index[:, 0], index[:, 1]]
    logits = lm.get_output_embeddings()(h).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, batch["actions"][:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = v_head(h.to(v_head.weight.dtype)).squeeze(-1).float()
    return logprobs, values, entropy


class PpoLoss(nn.Module):
    """The loss of one micro-batch: Σ over answer tokens of the clipped policy loss + vf_coef ×
    the clipped value loss, and its figures (sums; the loop divides by the update's tokens).
    It holds the value head, so the head is trained, synchronised and checkpointed with the policy."""

    def __init__(self, hidden_size: int, config: PpoConfig):
        super().__init__()
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.cliprange, self.cliprange_value, self.vf_coef = config.cliprange, config.cliprange_value, config.vf_coef

    def forward(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, values, entropy = policy_outputs(model, self.v_head, batch)
        pg, pg_clipped = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], self.cliprange)
        vf, vf_clipped = value_loss(values, batch["old_values"], batch["returns"], self.cliprange_value)
        log_ratio = (logprobs - batch["old_logprobs"]).detach()
        return (pg + self.vf_coef * vf).sum(), {
            "policy_loss": pg.detach().sum(), "value_loss": vf.detach().sum(), "clip_fraction": pg_clipped.sum(),
            "value_clip_fraction": vf_clipped.sum(), "entropy": entropy.detach().sum(),
            "approx_kl": (torch.expm1(log_ratio) - log_ratio).sum()}


def ppo_method(reward: RewardFn | None = None) -> Any:
    from .objectives import Method
    from .ppo_session import prepare

    return Method("ppo", build, collate, answer_tokens, lambda config: None,  # prepare gives the loss (value head)
                  unit="prompts", prepare=lambda *args: prepare(*args, reward=reward))


def run_ppo(config: PpoConfig, reward: RewardFn | None = None) -> Any:
    """`reward` replaces the reward model (tests: a programmatic reward)."""
    from .sft import run_training

    if reward is None and not config.reward_model:
        raise VicunaError("no reward model: pass --reward-model RM_DIR (a `vicuna train rm` run dir)")
    if reward is None:  # fail now, not after the policy and its reference have loaded
        from .score import check_reward_model

        check_reward_model(config.reward_model)
    return run_training(config, ppo_method(reward))
