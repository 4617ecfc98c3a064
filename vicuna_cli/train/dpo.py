"""`vicuna train dpo`: Direct Preference Optimization (Rafailov et al. 2023) from the SFT model on
preference pairs, with IPO (Azar et al. 2023) and hinge (SLiC) losses and an optional SFT term on
the chosen answer ("RPO", Pang et al. 2024), as a method of the loop, run dir, checkpoints, resume
and kernels of `train sft` (sft.run_training).

A sequence's log-probability is the sum over its answer tokens only: the assistant turns after
the prompt plus their end-of-turn marker, masked by labels.py from one rendered string tokenized
once (../shared/specs/masking.md). Chosen and rejected of a pair are one sample, packed into one
row without padding (positions restart per sequence) and summed per sequence by segment ids; with
`--share-prompt` (SDPA or eager attention) the row holds their common prefix once (`collate_shared`).

Losses and metrics follow TRL's DPOTrainer: with h = β·[(log π(c) − log π_ref(c)) − (log π(r) −
log π_ref(r))], sigmoid is −log σ(h), hinge max(0, 1 − h), IPO ((Δ_c/|c| − Δ_r/|r|) − 1/(2β))²
with Δ the log-ratios and |·| the answer tokens; rewards/chosen = β·Δ_c, rewards/rejected = β·Δ_r,
rewards/accuracies = [β·Δ_c > β·Δ_r], rewards/margins = β·(Δ_c − Δ_r), as means over the pairs of
a step. The SFT term is `--sft-weight` × the chosen answer's mean token NLL per pair (the RPO
paper's length-normalised NLL; TRL's "sft" loss averages over the tokens of the whole batch
instead, which is the same for one pair). Every term is summed over pairs and divided by the pairs
of the whole optimizer step (the loop's normalisation with "pairs" as the unit).

The reference (reference.py) is the SFT model itself, or `--ref-model`, or with `--lora` the base
with the adapter disabled; its log-probs are computed once before training and stored in the run
dir, unless `--no-precompute` keeps it in memory and runs it beside the policy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import VicunaError
from .labels import IGNORE, LabelBuilder
from .config import DpoConfig  # noqa: F401  (imported from here)
from .rm import unusable_pair

LOSSES = ("sigmoid", "ipo", "hinge")
FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
_CHUNK = 1024  # answer tokens per output-head chunk (kernels on): logits are recomputed in backward




@dataclass(frozen=True)
class DpoSample:
    id: str
    source: str
    chosen: list[int]
    chosen_labels: list[int]  # unshifted, as labels.Sample: answer tokens, else -100
    rejected: list[int]
    rejected_labels: list[int]
    ref: tuple[float, float] | None = None  # reference log-probs (chosen, rejected), once computed
    shared: int = 0  # leading tokens of both sides held once in a packed row (0: each side whole)
    n_supervised = 1  # one pair is one unit of the loss

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected) - self.shared

    def sides(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        return (self.chosen, self.chosen_labels), (self.rejected, self.rejected_labels)


def build_dpo_samples(pairs: Sequence[dict[str, Any]], tokenizer: Any, template: Any, max_length: int,
                      notes: Counter, share_prompt: bool = False) -> list[DpoSample]:
    """Render prompt + answer with the model's template and tokenize once per side; the labels are
    the answer's assistant turns (not the prompt's). Nothing is truncated: a pair whose prompt
    fills --max-length, or with a side longer than it, or whose sides tokenize the same, is
    skipped and counted (the last two as `train rm` counts them). `share_prompt`: record the
    tokens both sides share, for collate to hold once."""
    from .dataset import Conversation
    from .packing import common_prefix

    builder = LabelBuilder(tokenizer, template, max_length=1 << 62)  # never truncate: skip instead
    rendered, renderable = [], []
    for pair in pairs:
        in_prompt = sum(1 for m in pair["prompt"] if m["role"] == "assistant")
        try:  # the template checks the turns; one odd pair (HH-RLHF has a few) must not stop the run
            sides = [builder.render(Conversation(pair["id"], pair["prompt"] + pair[side])) for side in ("chosen", "rejected")]
        except VicunaError:
            notes["turns do not alternate user/assistant (skipped)"] += 1
            continue
        renderable.append(pair)
        rendered.extend((text, spans[in_prompt:]) for text, spans in sides)
    pairs = renderable
    encodings = builder.counter.encode_batch([text for text, _ in rendered])
    samples = []
    for k, pair in enumerate(pairs):
        sides = []
        for j in (2 * k, 2 * k + 1):
            (text, spans), encoding = rendered[j], encodings[j]
            sides.append(builder.mask(pair["id"], text, spans, encoding.ids, encoding.offsets, Counter()))
        if sides[0] is None or sides[1] is None:
            notes["an answer with no supervised token"] += 1
            continue
        chosen, rejected = sides
        prompt = min(next(i for i, t in enumerate(s.labels) if t != IGNORE) for s in sides)
        if prompt >= max_length:
            notes["prompt alone fills --max-length (skipped)"] += 1
        elif skip := unusable_pair(chosen.input_ids, rejected.input_ids, max_length):
            notes[skip] += 1
        else:
            shared = common_prefix(chosen.input_ids, rejected.input_ids) if share_prompt else 0
            samples.append(DpoSample(pair["id"], pair.get("source") or "", chosen.input_ids, chosen.labels,
                                     rejected.input_ids, rejected.labels, shared=shared))
    return samples


def build(config: DpoConfig, tokenizer: Any) -> tuple[list, list, Counter, str]:
    from .rm import build_pairs

    return build_pairs(config, tokenizer, build_dpo_samples, need_rejected=True)


def collate(samples: Sequence[DpoSample], packing: bool, pad_id: int) -> dict[str, Any]:
    """Chosen then rejected of each pair: one packed row (positions restart per sequence), or rows
    padded on the right. `targets` are the shifted labels of each sequence, `segments` the number
    of the sequence each position belongs to, `answer_tokens` each sequence's targets, and `ref`
    the reference log-probs [pairs, 2] when every sample has them. Packed samples with a shared
    prompt: see `collate_shared`."""
    from .packing import shifted

    if not samples:  # an empty micro-batch keeps the ranks in step with a zero loss
        return {"input_ids": torch.tensor([[pad_id]]), "position_ids": torch.tensor([[0]]),
                "targets": torch.tensor([[IGNORE]]), "segments": torch.tensor([[0]]),
                "answer_tokens": torch.zeros(0), "empty": torch.tensor(1)}
    sequences = [side for s in samples for side in s.sides()]
    targets = [shifted([IGNORE] + labels[1:]) for _, labels in sequences]
    batch: dict[str, Any] = {"answer_tokens": torch.tensor([sum(t != IGNORE for t in row) for row in targets],
                                                           dtype=torch.float32)}
    if all(s.ref is not None for s in samples):
        batch["ref"] = torch.tensor([s.ref for s in samples], dtype=torch.float64)
    if packing and any(s.shared for s in samples):
        return {**batch, **collate_shared(samples)}
    if packing:
        batch.update({"input_ids": torch.tensor([[t for ids, _ in sequences for t in ids]]),
                      "position_ids": torch.tensor([[p for ids, _ in sequences for p in range(len(ids))]]),
                      "targets": torch.tensor([[t for row in targets for t in row]]),
                      "segments": torch.tensor([[k for k, (ids, _) in enumerate(sequences) for _ in ids]])})
        return batch
    width = max(len(ids) for ids, _ in sequences)
    batch.update({"input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in sequences]),
                  "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences]),
                  "position_ids": torch.arange(width).expand(len(sequences), -1).clone(),
                  "targets": torch.tensor([row + [IGNORE] * (width - len(row)) for row in targets]),
                  "segments": torch.arange(len(sequences)).unsqueeze(1).expand(-1, width).clone()})
    return batch


def collate_shared(samples: Sequence[DpoSample]) -> dict[str, Any]:
    """One packed row where each pair's common prefix (the prompt) appears once
    (packing.shared_prefix_row). A target is read as (`gather`: the row position whose hidden
    state predicts it, `gather_targets`: the token, `segments`: its sequence)."""
    from .packing import row_position, shared_prefix_row

    batch, placements = shared_prefix_row([(s.chosen, s.rejected, s.shared) for s in samples])
    gather, gather_targets, segments = [], [], []
    for k, (sample, placement) in enumerate(zip(samples, placements)):
        for side, (side_ids, labels) in enumerate(sample.sides()):
            for t in range(1, len(side_ids)):
                if labels[t] != IGNORE:
                    gather.append(row_position(placement, side, t - 1))
                    gather_targets.append(side_ids[t])
                    segments.append(2 * k + side)
    return {**batch, "gather": torch.tensor(gather, dtype=torch.long),
            "gather_targets": torch.tensor(gather_targets, dtype=torch.long),
            "segments": torch.tensor(segments, dtype=torch.long)}


def pairs_in(samples: Sequence[DpoSample]) -> int:
    return len(samples)


def sequence_logps(model: Any, batch: dict, chunked: bool = False) -> torch.Tensor:
    """Sum of log p(answer token) per sequence of `batch` (fp32 or wider, in order chosen, rejected, ...).
    Only answer positions go through the output head; with `chunked` their logits are made
    _CHUNK tokens at a time and recomputed in backward, so [answer tokens × vocab] never lives
    whole (the vocabulary of 7B+ models makes that gigabytes)."""
    from torch.utils.checkpoint import checkpoint

    from .modeling import _has_custom_head, causal_lm, decoder_inputs

    lm = causal_lm(model)
    inputs = decoder_inputs(lm, batch)
    if "gather" in batch:  # collate_shared: rows are positions of the one packed row
        rows, targets, segments = batch["gather"], batch["gather_targets"], batch["segments"]
    else:
        keep = batch["targets"] != IGNORE
        rows, targets, segments = keep, batch["targets"][keep], batch["segments"][keep]

    def pick(states: torch.Tensor) -> torch.Tensor:
        return states.flatten(0, 1)[rows] if "gather" in batch else states[rows]

    head = lm.get_output_embeddings()
    if _has_custom_head(lm, head):  # softcapped / scaled logits: let the model compute them
        token = _token_logps(pick(model(**inputs, use_cache=False).logits), targets)
    else:
        # No attention mask on packed rows: transformers reads sample boundaries from position_ids.
        hidden = pick(lm.get_decoder()(**inputs, use_cache=False).last_hidden_state)
        if chunked and hidden.shape[0] > _CHUNK and torch.is_grad_enabled():
            token = torch.cat([checkpoint(_head_logps, head, hidden[i:i + _CHUNK], targets[i:i + _CHUNK],
                                          use_reentrant=False) for i in range(0, hidden.shape[0], _CHUNK)])
        else:
            token = _head_logps(head, hidden, targets)
    n_sequences = batch["answer_tokens"].numel()
    return torch.zeros(n_sequences, dtype=token.dtype, device=token.device).index_add(0, segments, token)


def _head_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _token_logps(head(hidden), targets)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log-softmax in at least fp32 (bf16 logits lose the sums' precision; fp64 stays fp64)
    return -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def dpo_terms(config: DpoConfig, policy: torch.Tensor, ref: torch.Tensor, answer_tokens: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss of the pairs and their figures (sums) from sequence log-probs: `policy` and
    `answer_tokens` [2·pairs] in order chosen, rejected, ...; `ref` [pairs, 2]."""
    ref = ref.to(policy.dtype)
    chosen, rejected = policy[0::2], policy[1::2]
    chosen_ratio, rejected_ratio = chosen - ref[:, 0], rejected - ref[:, 1]
    h = config.beta * (chosen_ratio - rejected_ratio)
    if config.loss == "sigmoid":
        losses = -F.logsigmoid(h)
    elif config.loss == "hinge":
        losses = torch.relu(1 - h)
    else:  # ipo: length-normalised log-ratios, as TRL (confirmed with the IPO authors)
        n_chosen, n_rejected = answer_tokens[0::2].clamp(min=1), answer_tokens[1::2].clamp(min=1)
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * config.beta)) ** 2
    if config.sft_weight:
        losses = losses - config.sft_weight * chosen / answer_tokens[0::2].clamp(min=1)
    chosen_reward, rejected_reward = config.beta * chosen_ratio.detach(), config.beta * rejected_ratio.detach()
    values = (chosen_reward, rejected_reward, (chosen_reward > rejected_reward).float(),
              chosen_reward - rejected_reward, chosen.detach(), rejected.detach())
    return losses.sum(), {name: v.double().sum() for name, v in zip(FIGURES, values)}


Reference = Callable[[Any, dict], torch.Tensor]  # (policy model, batch) -> sequence log-probs [2·pairs]


def dpo_loss(config: DpoConfig, reference: Reference | None = None) -> Callable:
    """LossFn for the loop: (summed loss, figures). The reference log-probs come with the batch
    (precomputed) or from `reference`, run without gradients beside the policy."""
    chunked = config.kernels != "off"

    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(model, batch, chunked)
        if "empty" in batch:
            zero = policy.sum() * 0.0
            return zero, {name: zero.detach().double() for name in FIGURES}
        if "ref" in batch:
            ref = batch["ref"]
        elif reference is not None:
            with torch.no_grad():
                ref = reference(model, batch).view(-1, 2)
        else:
            raise RuntimeError("DPO batch without reference log-probs and no reference model")
        return dpo_terms(config, policy, ref, batch["answer_tokens"])

    return loss


def dpo_method() -> Any:
    from .objectives import Method
    from .reference import prepare

    return Method("dpo", build, collate, pairs_in, lambda config: dpo_loss(config), unit="pairs", prepare=prepare)


def run_dpo(config: DpoConfig) -> Any:
    from .sft import run_training

    return run_training(config, dpo_method())
