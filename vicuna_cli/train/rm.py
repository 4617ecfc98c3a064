"""`vicuna train rm`: a reward model (StableVicuna stage 2) on the loop, run dir, checkpoints,
resume and kernels of `train sft` (sft.run_training), with the pair parts below as its method.

The model is the SFT model as a transformers `*ForSequenceClassification` with one label: a scalar
head on the last hidden state at the last token of each (prompt + answer) rendered with the model's
template, so the run dir loads back with `AutoModelForSequenceClassification`. The loss is
Bradley–Terry, `-log σ(r_chosen − r_rejected − margin)` summed over pairs and divided by the pairs
of the whole optimizer step (the loop's normalisation with "pairs" as the supervised unit), which
equals TRL's `RewardTrainer` mean when a step is one batch. Chosen and rejected of a pair are one
sample, so they always share a micro-batch; packed rows hold them without padding, and with
`--share-prompt` (default, SDPA or eager attention) hold the prompt both sides share once
(packing.shared_prefix_row: exact, since attention is causal; on HH-RLHF the prompt is most of
each side).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import VicunaError
from ..core.templates import template_for_model
from ..data.split import TokenCounter
from .config import PairTrainConfig, RewardConfig  # noqa: F401  (RewardConfig: imported from here)






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


def build_pair_samples(pairs: Sequence[dict[str, Any]], tokenizer: Any, template: Any, max_length: int,
                       notes: Counter, share_prompt: bool = False) -> list[PairSample]:
    """Render prompt + answer with the model's template and tokenize once per side. A side longer
    than --max-length is never cut (the reward is read at the last token): the pair is skipped
    and counted; so are pairs whose sides tokenize the same. `share_prompt`: record the tokens
    both sides share, for collate to hold once."""
    from .packing import common_prefix

    counter = TokenCounter(tokenizer, template)
    texts = [counter.render(p["prompt"] + p[side]) for p in pairs for side in ("chosen", "rejected")]
    encodings = counter.encode_batch(texts)
    samples = []
    for k, pair in enumerate(pairs):
        chosen, rejected = list(encodings[2 * k].ids), list(encodings[2 * k + 1].ids)
        skip = unusable_pair(chosen, rejected, max_length)
        if skip:
            notes[skip] += 1
        else:
            samples.append(PairSample(pair["id"], pair.get("source") or "", chosen, rejected, float(pair.get("margin") or 0.0),
                                      common_prefix(chosen, rejected) if share_prompt else 0))
    return samples


def unusable_pair(chosen: Sequence[int], rejected: Sequence[int], max_length: int) -> str | None:
    """Why a tokenized pair is skipped (the reason it is counted under), or None."""
    if max(len(chosen), len(rejected)) > max_length:
        return "pair longer than --max-length (skipped, not truncated)"
    if list(chosen) == list(rejected):
        return "chosen and rejected tokenize the same"
    return None


def build(config: RewardConfig, tokenizer: Any) -> tuple[list, list, Counter, str]:
    return build_pairs(config, tokenizer, build_pair_samples)


def build_pairs(config: PairTrainConfig, tokenizer: Any, to_samples: Any, need_rejected: bool = False
                ) -> tuple[list, list, Counter, str]:
    """Read the pair files, hold out --eval-split/--eval-data, and turn pairs into a method's
    samples with `to_samples(pairs, tokenizer, template, max_length, notes, share_prompt)`."""
    from ..data.preferences import read_pairs
    from .dataset import split_eval
    from .modeling import shares_prompt

    if not config.data:
        raise VicunaError("no training data: pass --data PAIRS.jsonl (from `vicuna data pairs`)")
    template = template_for_model(tokenizer, config.template)
    notes: Counter = Counter()
    pairs = read_pairs(config.data, notes, config.shp_min_ratio, need_rejected)
    if config.eval_data:
        train, held = pairs, read_pairs(config.eval_data, Counter(), config.shp_min_ratio, need_rejected)
    else:
        train, held = split_eval(pairs, config.eval_split, config.seed)
    share = shares_prompt(config)
    samples = to_samples(train, tokenizer, template, config.max_length, notes, share)
    eval_samples = to_samples(held, tokenizer, template, config.max_length, Counter(), share)
    if not samples:
        raise VicunaError(f"no usable preference pair ({len(pairs)} read; "
                          + (", ".join(f"{k}: {v}" for k, v in sorted(notes.items())) or "none usable") + ")",
                          hint="make pairs with `vicuna data pairs`, or raise --max-length")
    return samples, eval_samples, notes, template.name


def collate(samples: Sequence[PairSample], packing: bool, pad_id: int) -> dict[str, Any]:
    """Chosen then rejected of each pair, as one packed row (positions restart per sequence) or
    as rows padded on the right; `ends` is (row, column) of each sequence's last token."""
    if not samples:  # an empty micro-batch keeps the ranks in step with a zero loss
        return {"input_ids": torch.tensor([[pad_id]]), "position_ids": torch.tensor([[0]]),
                "ends": torch.tensor([[0, 0]]), "margin": torch.zeros(0), "empty": torch.tensor(1)}
    sequences = [ids for s in samples for ids in (s.chosen, s.rejected)]
    margin = torch.tensor([s.margin for s in samples], dtype=torch.float32)
    if packing and any(s.shared for s in samples):
        from .packing import row_position, shared_prefix_row

        batch, placements = shared_prefix_row([(s.chosen, s.rejected, s.shared) for s in samples])
        ends = [[0, row_position(at, side, len(ids) - 1)] for s, at in zip(samples, placements)
                for side, ids in enumerate((s.chosen, s.rejected))]
        return {**batch, "ends": torch.tensor(ends), "margin": margin}
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


def pairs_in(samples: Sequence[PairSample]) -> int:
    return len(samples)


def rewards(model: Any, batch: dict) -> torch.Tensor:
    """The scalar reward of every sequence of `batch`, in order (chosen, rejected, chosen, ...)."""
    from .modeling import causal_lm, decoder_inputs

    classifier = causal_lm(model)
    decoder = getattr(classifier, classifier.base_model_prefix)
    hidden = decoder(**decoder_inputs(classifier, batch), use_cache=False).last_hidden_state
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
    for group in split_step(list(range(len(spec.eval_samples))), spec.eval_lengths, world, rank, spec.config.packing,
                            spec.config.row_capacity, spec.config.micro_batch_size):
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
