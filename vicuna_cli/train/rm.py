"""`vicuna train rm`: a reward model (StableVicuna stage 2) on the loop, run dir, checkpoints,
resume and kernels of `train sft` (sft.run_training), with the pair parts below as its method.

The model is the SFT model as a transformers `*ForSequenceClassification` with one label: a scalar
head on the last hidden state at the last token of each (prompt + answer) rendered with the model's
template, so the run dir loads back with `AutoModelForSequenceClassification`. The loss is
Bradley–Terry, `-log σ(r_chosen − r_rejected − margin)` summed over pairs and divided by the pairs
of the whole optimizer step (the loop's normalisation with "pairs" as the supervised unit), which
equals TRL's `RewardTrainer` mean when a step is one batch. Chosen and rejected of a pair are one
sample, so they always share a micro-batch; packed rows hold them without padding.

Both sides of a pair render the same prompt, so a packed row holds that prompt once (`--share-prompt`,
on by default with SDPA): the tokens both sides share, then the chosen answer, then the rejected
one, under a mask in which the rejected answer sees the prompt and itself but not the chosen answer,
with positions continuing from the prompt on both branches. Causal attention makes every reward
the same as with each side whole (tested); on HH-RLHF the prompt is most of each side, so a step
reads about half the tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..core.errors import VicunaError
from ..core.templates import template_for_model
from ..data.split import TokenCounter
from .config import TrainConfig


class RewardConfig(TrainConfig):
    """`train sft`'s options; a reward model trains one epoch at a lower rate (InstructGPT, TRL)."""

    epochs: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    global_batch_size: int | None = Field(64, ge=1)  # pairs per optimizer step
    shp_min_ratio: float = Field(2.0, ge=1.0)
    share_prompt: bool = True  # packed rows hold a pair's common prompt once (with SDPA attention)

    @model_validator(mode="after")
    def _no_merge(self) -> "RewardConfig":
        if self.merge:
            raise ValueError("--merge is not available for reward models yet: the LoRA adapter and its score head "
                             "are saved to RUN_DIR/adapter")
        return self

    @property
    def row_capacity(self) -> int:
        # --max-length bounds each sequence; a packed row must hold both sides of a pair.
        return self.micro_batch_tokens or 2 * self.max_length

    def batch_size(self) -> int | None:
        return None if self.global_batch_tokens is not None else self.global_batch_size


@dataclass(frozen=True)
class PairSample:
    id: str
    source: str
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    shared: int = 0  # leading tokens of both sides held once in a packed row (0: each side whole)
    n_supervised = 1  # one pair is one unit of the loss

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected) - self.shared


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading tokens `a` and `b` share, leaving each at least its last token (where its reward is read)."""
    most = min(len(a), len(b)) - 1
    n = 0
    while n < most and a[n] == b[n]:
        n += 1
    return n


def build_pair_samples(pairs: Sequence[dict[str, Any]], tokenizer: Any, template: Any, max_length: int,
                       notes: Counter, share_prompt: bool = False) -> list[PairSample]:
    """Render prompt + answer with the model's template and tokenize once per side. A side longer
    than --max-length is never cut (the reward is read at the last token): the pair is skipped
    and counted; so are pairs whose sides tokenize the same. `share_prompt`: record the tokens
    both sides share, for collate to hold once."""
    counter = TokenCounter(tokenizer, template)
    texts = [counter.render(p["prompt"] + p[side]) for p in pairs for side in ("chosen", "rejected")]
    encodings = counter.encode_batch(texts)
    samples = []
    for k, pair in enumerate(pairs):
        chosen, rejected = list(encodings[2 * k].ids), list(encodings[2 * k + 1].ids)
        if max(len(chosen), len(rejected)) > max_length:
            notes["pair longer than --max-length (skipped, not truncated)"] += 1
        elif chosen == rejected:
            notes["chosen and rejected tokenize the same"] += 1
        else:
            samples.append(PairSample(pair["id"], pair.get("source") or "", chosen, rejected, float(pair.get("margin") or 0.0),
                                      common_prefix(chosen, rejected) if share_prompt else 0))
    return samples


def build(config: RewardConfig, tokenizer: Any) -> tuple[list, list, Counter, str]:
    from ..data.preferences import read_pairs
    from .dataset import split_eval

    if not config.data:
        raise VicunaError("no training data: pass --data PAIRS.jsonl (from `vicuna data pairs`)")
    template = template_for_model(tokenizer, config.template)
    notes: Counter = Counter()
    pairs = read_pairs(config.data, notes, config.shp_min_ratio)
    if config.eval_data:
        train, held = pairs, read_pairs(config.eval_data, Counter(), config.shp_min_ratio)
    else:
        train, held = split_eval(pairs, config.eval_split, config.seed)
    share = shares_prompt(config)
    samples = build_pair_samples(train, tokenizer, template, config.max_length, notes, share)
    eval_samples = build_pair_samples(held, tokenizer, template, config.max_length, Counter(), share)
    if not samples:
        raise VicunaError(f"no usable preference pair ({len(pairs)} read; "
                          + (", ".join(f"{k}: {v}" for k, v in sorted(notes.items())) or "none usable") + ")",
                          hint="make pairs with `vicuna data pairs`, or raise --max-length")
    return samples, eval_samples, notes, template.name


def shares_prompt(config: RewardConfig) -> bool:
    """--share-prompt needs packed rows and SDPA, which takes the boolean mask as it is: flash-attn's
    varlen kernels see only where sequences start (position ids), and eager attention adds the
    mask to the scores, so with them each side stays whole."""
    from .modeling import pick_training_attention, training_device

    return (config.share_prompt and config.packing
            and pick_training_attention(config.attention, training_device(config), True)[0] == "sdpa")


def collate(samples: Sequence[PairSample], packing: bool, pad_id: int) -> dict[str, Any]:
    """Chosen then rejected of each pair, as one packed row (positions restart per sequence) or
    as rows padded on the right; `ends` is (row, column) of each sequence's last token."""
    if not samples:  # an empty micro-batch keeps the ranks in step with a zero loss
        return {"input_ids": torch.tensor([[pad_id]]), "position_ids": torch.tensor([[0]]),
                "ends": torch.tensor([[0, 0]]), "margin": torch.zeros(0), "empty": torch.tensor(1)}
    sequences = [ids for s in samples for ids in (s.chosen, s.rejected)]
    margin = torch.tensor([s.margin for s in samples], dtype=torch.float32)
    if packing and any(s.shared for s in samples):
        return {**_shared_prompt_row(samples), "margin": margin}
    if packing:
        ends, at = [], 0
        for ids in sequences:
            at += len(ids)
            ends.append([0, at - 1])
        return {"input_ids": torch.tensor([[t for ids in sequences for t in ids]]),
                "position_ids": torch.tensor([[p for ids in sequences for p in range(len(ids))]]),
                "ends": torch.tensor(ends), "margin": margin}
    width = max(len(ids) for ids in sequences)
    return {"input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences]),
            "position_ids": torch.arange(width).expand(len(sequences), -1).clone(),
            "ends": torch.tensor([[row, len(ids) - 1] for row, ids in enumerate(sequences)]), "margin": margin}


def _shared_prompt_row(samples: Sequence[PairSample]) -> dict[str, Any]:
    """One packed row of [shared prompt, chosen answer, rejected answer] per pair, and the 4D
    boolean mask (True: may attend) that gives each answer the prompt and itself, causally."""
    ids: list[int] = []
    positions: list[int] = []
    pair: list[int] = []
    branch: list[int] = []  # 0 shared prompt, 1 chosen answer, 2 rejected answer
    ends = []
    for k, s in enumerate(samples):
        start, n = len(ids), s.shared
        ids += s.chosen + s.rejected[n:]
        positions += list(range(len(s.chosen))) + list(range(n, len(s.rejected)))
        pair += [k] * len(s)
        branch += [0] * n + [1] * (len(s.chosen) - n) + [2] * (len(s.rejected) - n)
        ends += [[0, start + len(s.chosen) - 1], [0, start + len(s) - 1]]
    pair_of, branch_of, at = torch.tensor(pair), torch.tensor(branch), torch.arange(len(ids))
    mask = ((pair_of[:, None] == pair_of[None, :]) & (at[None, :] <= at[:, None])
            & ((branch_of[None, :] == 0) | (branch_of[None, :] == branch_of[:, None])))
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "attention_mask": mask[None, None], "ends": torch.tensor(ends)}


def pairs_in(samples: Sequence[PairSample]) -> int:
    return len(samples)


def rewards(model: Any, batch: dict) -> torch.Tensor:
    """The scalar reward of every sequence of `batch`, in order (chosen, rejected, chosen, ...)."""
    from .modeling import causal_lm

    classifier = causal_lm(model)
    decoder = getattr(classifier, classifier.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    ends = batch["ends"]
    return classifier.score(hidden[ends[:, 0], ends[:, 1]]).squeeze(-1).float()


def rm_loss(model: Any, batch: dict) -> torch.Tensor:
    """Sum over the micro-batch's pairs of -log σ(r_chosen − r_rejected − margin); with
    `batch["want_rewards"]` the rewards themselves (eval)."""
    scores = rewards(model, batch)
    if "empty" in batch:
        return scores.sum() * 0.0
    if batch.get("want_rewards") is not None:
        return scores
    return -F.logsigmoid(scores[0::2] - scores[1::2] - batch["margin"]).sum()


@torch.no_grad()
def evaluate_pairs(accelerator: Any, module: Any, spec: Any) -> dict[str, Any]:
    """Pair accuracy (r_chosen > r_rejected), mean margin r_chosen − r_rejected, and accuracy per
    source, over the eval pairs (every rank scores its share; the sums are reduced)."""
    from .packing import split_step

    world, rank = accelerator.num_processes, accelerator.process_index
    sources = sorted({s.source for s in spec.eval_samples})
    totals = torch.zeros(len(sources) + 1, 3, dtype=torch.float64, device=accelerator.device)  # right, n, margin
    module.eval()
    for group in split_step(list(range(len(spec.eval_samples))), spec.eval_lengths, world, rank, spec.packing,
                            spec.capacity, spec.micro_batch_size):
        samples = [spec.eval_samples[i] for i in group]
        batch = {k: v.to(accelerator.device) for k, v in spec.collate(samples).items()}
        scores = module({**batch, "want_rewards": torch.tensor(1)})
        if not samples:
            continue
        margins = (scores[0::2] - scores[1::2]).double()
        for sample, margin in zip(samples, margins):
            for row in (0, 1 + sources.index(sample.source)):
                totals[row] += torch.stack([(margin > 0).double(), torch.ones_like(margin), margin])
    module.train()
    totals = accelerator.reduce(totals, "sum") if world > 1 else totals
    n = float(totals[0, 1])
    return {"eval_accuracy": float(totals[0, 0]) / n if n else float("nan"),
            "eval_margin": float(totals[0, 2]) / n if n else float("nan"),
            "eval_accuracy_by_source": {s: float(totals[i + 1, 0] / totals[i + 1, 1]) for i, s in enumerate(sources)}}


def reward_method() -> Any:
    from .objectives import Method

    return Method("rm", build, collate, pairs_in, lambda config: rm_loss, head="reward",
                  eval_metrics=evaluate_pairs, unit="pairs")


def run_rm(config: RewardConfig) -> Any:
    from .sft import run_training

    return run_training(config, reward_method())
