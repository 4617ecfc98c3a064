"""Cross-entropy of a linear head without materialising all the logits.

For a 32K-152K vocabulary, the logits of a 2048-token row ([tokens, vocab], then an fp32 copy, the
log-softmax and its gradient) dominate the memory of fine-tuning small and mid-size models.
`linear_cross_entropy` drops the unsupervised tokens (label -100) first, then walks the others in
chunks: for each chunk it computes the logits, the summed loss and, right away, the gradients with
respect to the hidden states and the head weight, and frees the chunk's logits. Backward only
scales the gradients computed in forward by the incoming gradient, so nothing is recomputed and
the matmuls are the same three the plain computation does. Peak extra memory is one chunk of
logits plus an fp32 accumulator the size of the head weight.

Results equal the plain computation (`reference_linear_cross_entropy`) to float tolerance. The
same code runs on CPU and CUDA: it is matmuls and elementwise torch ops, where a Triton kernel
would save little (the softmax is done in place on a chunk that is already bounded).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# Logit elements per chunk: 8M (32 MiB in fp32). At SmolLM2's vocabulary of 49152 that is 170
# tokens, small enough to stay well under a quarter of the plain loss's memory at 2048 tokens
# and large enough that per-chunk overhead is lost in the matmul time (benchmarks/bench_fused_loss.py).
CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: a fixed budget of logit elements, at least 16 tokens."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab_size))


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses of `hidden @ weight.T` against `labels` (-100 ignored). The reference.

    This is what HF's causal-LM loss does (logits upcast to fp32, then cross-entropy), summed.
    """
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@functools.lru_cache(maxsize=None)
def low_precision_gemm_is_fast(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a bf16/fp16 matmul beats an fp32 one here: on GPUs yes; on CPUs only with native
    instructions (AVX512-BF16 / AMX), as torch reports them. Without them (e.g. AVX-512 Xeons
    before Cooper Lake) torch emulates bf16 and an fp32 matmul is ~3x faster (measured here)."""
    if device_type != "cpu":
        return True
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if dtype == torch.bfloat16:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    if dtype == torch.float16:
        return bool(caps.get("avx512_fp16") or caps.get("amx_fp16"))
    return False


def _check_targets(target: torch.Tensor, vocab_size: int) -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab_size):
        bad = target[(target < 0) | (target >= vocab_size)][:5].tolist()
        raise ValueError(f"labels must be {IGNORE_INDEX} or in [0, {vocab_size}); got {bad}")


def _chunked_loss_and_grads(
    rows: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, chunk_size: int, want_rows: bool, want_weight: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over `rows` (all supervised) and, if asked, d(sum)/d(rows) and d(sum)/d(weight)."""
    # Softmax and accumulation in at least fp32 (fp64 stays fp64, for exact tests).
    acc = torch.promote_types(weight.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=rows.device)
    grad_rows = torch.empty_like(rows) if want_rows else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
    # The weight gradient sums over every token: it is accumulated in fp32, and for bf16/fp16
    # models computed by an fp32 matmul straight from the fp32 softmax gradient where low
    # precision has no fast path (more exact too); otherwise one low-precision matmul per chunk.
    weight_grad_in_acc = weight.dtype == acc or not low_precision_gemm_is_fast(weight.device.type, weight.dtype)
    for start in range(0, rows.shape[0], chunk_size):
        x = rows[start : start + chunk_size]
        t = target[start : start + chunk_size]
        logits = (x @ weight.T).to(acc)  # a no-op for fp32: the matmul's output is reused in place
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not (want_rows or want_weight):
            continue
        # d(sum loss)/d(logits) = softmax - one_hot, built in the logits' own buffer.
        grad_logits = logits.sub_(lse[:, None]).exp_()
        grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
        del logits, lse
        if want_rows:  # in the model's dtype, like the plain loss (a no-op cast for fp32)
            torch.mm(grad_logits.to(weight.dtype), weight, out=grad_rows[start : start + chunk_size])
        if want_weight:
            if weight_grad_in_acc:
                grad_weight.addmm_(grad_logits.T, x.to(acc))
            else:
                grad_weight += grad_logits.to(weight.dtype).T @ x
        del grad_logits
    return total, grad_rows, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        flat = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The ignore-skip: prompt tokens cost nothing (often half of an SFT batch).
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        every_row = keep.numel() == labels.numel()
        rows = flat if every_row else flat.index_select(0, keep)
        target = labels if every_row else labels.index_select(0, keep)
        _check_targets(target, weight.shape[0])
        total, grad_rows, grad_weight = _chunked_loss_and_grads(
            rows, target, weight, chunk_size, want_hidden, want_weight
        )
        grad_hidden = None
        if want_hidden:
            if every_row:
                grad_hidden = grad_rows
            else:
                grad_hidden = torch.zeros_like(flat).index_copy_(0, keep, grad_rows)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        # The gradients were computed in forward; scale them in place (no second full-size copy).
        # Calling backward twice (retain_graph) is refused by autograd's saved-tensor version check.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output).reshape(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Sum over supervised tokens of the cross-entropy of `hidden @ weight.T` (labels -100 ignored).

    `hidden` is [..., hidden_size], `labels` has its leading shape and is already shifted (label i
    is the target of position i). Returns the SUM, so callers can divide by the number of
    supervised tokens of the whole global batch (micro-batches, accumulation and ranks together),
    as the training spec requires; with no supervised token it is 0 and every gradient is 0.
    `chunk_size` (tokens per chunk) defaults to `default_chunk_size(vocab)`.
    Under autocast, both operands are cast to the autocast dtype, as `F.linear` would be.
    """
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not fit a head weight of shape {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    chunk_size = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    labels = labels.to(hidden.device)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
        # Evaluation: the same chunked loss, no gradient work.
        flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        keep = flat_labels != IGNORE_INDEX
        target = flat_labels[keep]
        _check_targets(target, weight.shape[0])
        return _chunked_loss_and_grads(flat[keep], target, weight, chunk_size, False, False)[0]
