"""What to write for each output tensor, decided from the headers alone, and how to compute it.

Rules (the same for apply and make):
- A floating-point tensor present in both inputs with the same shape is added (apply: base +
  delta) or subtracted (make: target - base), in fp32, then cast to the output dtype.
- Embedding / LM-head rows beyond the base's vocabulary (tokens added by the fine-tune, e.g.
  StableVicuna's `[PAD]`) come from the delta unchanged, as if the base had zero rows there —
  what the original StableVicuna procedure did; make-delta stores the target's rows there.
  Any other shape mismatch is an error naming the tensor and both shapes.
- Non-float tensors are not deltas: they are copied from the delta (make: the target).
- `rotary_emb.inv_freq` buffers (saved by old transformers, recomputed on load) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..core.errors import VicunaError
from .lora import AdapterPlan, LoraPair
from .shards import TensorInfo, TensorSpec, WeightSource

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_out|word_embeddings|tok_embeddings|output)\.weight$")
SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
CHUNK = 1 << 20  # elements per fp32 slab: bounds the temporaries, and 4 MB slabs stay in cache (8x faster than 32 MB ones here)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # core.choices names


@dataclass(frozen=True)
class Step:
    out: TensorSpec
    action: str  # add | subtract | copy | keep | replace | merge
    source: str | None = None  # for replace: the adapter tensor that replaces the base one
    lora: LoraPair | None = None

    @property
    def name(self) -> str:
        return self.out.name


def plan_arithmetic(base: WeightSource, other: WeightSource, make: bool,
                    dtype_for: Callable[[TensorInfo, TensorInfo], torch.dtype]) -> tuple[list[Step], list[str]]:
    """Steps for apply (`other` is the delta) or make (`other` is the target), and skipped names."""
    skipped = sorted(n for n in {*base.tensors, *other.tensors} if SKIPPED.search(n))
    ours = [n for n in base.tensors if not SKIPPED.search(n)]
    theirs = [n for n in other.tensors if not SKIPPED.search(n)]
    _require_same_names(ours, theirs, base.label, other.label)
    steps = []
    for name in ours:
        b, o = base.tensors[name], other.tensors[name]
        if not (b.is_float and o.is_float):
            _require_same_shape(b, o, base.label, other.label)
            steps.append(Step(TensorSpec(name, o.dtype, o.shape), "copy"))
            continue
        grows = (VOCAB_TENSOR.search(name) and len(o.shape) == len(b.shape) == 2
                 and o.shape[1] == b.shape[1] and o.shape[0] > b.shape[0])
        if not grows:
            _require_same_shape(b, o, base.label, other.label)
        steps.append(Step(TensorSpec(name, dtype_for(b, o), o.shape), "subtract" if make else "add"))
    return steps, skipped


def plan_merge(base: WeightSource, adapter: WeightSource, plan: AdapterPlan,
               dtype_for: Callable[[TensorInfo], torch.dtype]) -> list[Step]:
    steps = []
    for name, info in base.tensors.items():
        source = plan.replacements.get(name)
        shape = adapter.tensors[source].shape if source else info.shape
        if source and shape != info.shape and not (VOCAB_TENSOR.search(name) and shape[1:] == info.shape[1:]):
            _require_same_shape(info, adapter.tensors[source], base.label, adapter.label)
        out = TensorSpec(name, dtype_for(info) if info.is_float else info.dtype, shape)
        if name in plan.pairs:
            steps.append(Step(out, "merge", source=source, lora=plan.pairs[name]))
        else:
            steps.append(Step(out, "replace" if source else "keep", source=source))
    return steps


def _require_same_names(ours: list[str], theirs: list[str], label: str, other: str) -> None:
    for have, lack, where, missing_from in ((ours, set(theirs), label, other), (theirs, set(ours), other, label)):
        missing = [n for n in have if n not in lack]
        if missing:
            raise VicunaError(
                f"the {missing_from} is missing {len(missing)} tensor(s) that the {where} has: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                hint=f"the {label} and the {other} must be the same architecture; check that the delta "
                "was made against this base and that no shard is missing",
            )


def _require_same_shape(a: TensorInfo, b: TensorInfo, label: str, other: str) -> None:
    if a.shape != b.shape:
        raise VicunaError(
            f"shape mismatch for {a.name}: {label} {list(a.shape)}, {other} {list(b.shape)}",
            hint="only embedding / LM-head rows may differ (tokens added beyond the base vocabulary); "
            "check that the delta was made against this base",
        )


# ---------------------------------------------------------------------------------------------
# Computing one output tensor, as flat slabs the writer streams to disk


@dataclass
class Tally:
    inexact: int = 0  # make-delta: values that base + delta, as apply computes it, will not give back


def compute(step: Step, base: WeightSource, other: WeightSource, tally: Tally) -> Iterator[torch.Tensor]:
    """The output tensor of `step` as consecutive flat slabs of at most CHUNK values."""
    name, dtype = step.name, step.out.dtype
    if step.action == "copy":
        yield from _cast(other.read(name).reshape(-1), dtype)
        return
    w = other.read(step.source) if step.source else base.read(name)
    if step.action in ("keep", "replace"):
        yield from _cast(w.reshape(-1), dtype)
        return
    if step.action == "merge":
        yield from _merge(w, other.read(step.lora.a), other.read(step.lora.b), step.lora, dtype)
        return
    theirs, w = other.read(name).reshape(-1), w.reshape(-1)
    common = w.numel()  # beyond it: the rows of added vocabulary, which only `other` has
    if step.action == "add":
        yield from _elementwise(w, theirs[:common], torch.add, dtype)
        yield from _cast(theirs[common:], dtype)
        return
    yield from _elementwise(theirs[:common], w, torch.sub, dtype, tally)
    yield from _cast(theirs[common:], dtype, tally)


def _cast(flat: torch.Tensor, dtype: torch.dtype, tally: Tally | None = None) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), CHUNK):
        slab = flat[start:start + CHUNK]
        result = slab.to(dtype)
        if tally is not None:  # make: added rows are stored as they are, exact unless --dtype narrows them
            tally.inexact += int((result.to(flat.dtype) != slab).sum())
        yield result


def _elementwise(x: torch.Tensor, y: torch.Tensor, op, dtype: torch.dtype, tally: Tally | None = None) -> Iterator[torch.Tensor]:
    """op(x, y) in fp32, cast to `dtype`. With a `tally` (make: x = target, y = base), count the
    values where y + result, as apply computes it, would not give x back exactly."""
    for start in range(0, x.numel(), CHUNK):
        xs, ys = x[start:start + CHUNK], y[start:start + CHUNK].float()
        result = op(xs.float(), ys).to(dtype)
        if tally is not None:
            tally.inexact += int(((ys + result.float()).to(x.dtype) != xs).sum())
        yield result


def _merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: LoraPair, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """w + (B @ A) * scale (transposed for embeddings), a block of rows at a time, so the
    full-size fp32 update never exists."""
    a32, b32 = a.float(), b.float()
    rows = max(1, CHUNK // max(1, w[0].numel()))
    for start in range(0, w.shape[0], rows):
        part = slice(start, start + rows)
        update = a32[:, part].T @ b32.T if lora.transposed else b32[part] @ a32
        yield (w[part].float() + update * lora.scale).to(dtype).reshape(-1)
