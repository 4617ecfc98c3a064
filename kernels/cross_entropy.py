"""Cross-entropy of a linear head without materialising all the logits.

For a 32K-152K vocabulary, the logits of a 2048-token row ([tokens, vocab] in fp32) dominate the
memory of fine-tuning small and mid-size models. `linear_cross_entropy` walks the tokens in chunks:
for each chunk it computes the logits, the summed loss and, right away, the gradients with
respect to the hidden states and the head weight, then frees the chunk's logits. Peak extra
memory is one chunk of logits instead of all of them; results equal the plain computation
(`reference_linear_cross_entropy`) to float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses of `hidden @ weight.T` against `labels` (-100 ignored). The reference."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        flat = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # Softmax and accumulation in at least fp32 (fp64 stays fp64, for exact tests).
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(flat) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=acc, device=flat.device)
        for start in range(0, flat.shape[0], chunk_size):
            rows = flat[start : start + chunk_size]
            target = labels[start : start + chunk_size]
            keep = target != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            logits = (rows @ weight.T).to(acc)
            log_probs = torch.log_softmax(logits, dim=-1)
            safe_target = target.clamp_min(0)
            picked = log_probs.gather(1, safe_target[:, None]).squeeze(1)
            total -= (picked * keep).sum()
            if needs_grad:
                # d(sum loss)/d(logits) = softmax - one_hot, on supervised rows only.
                grad_logits = log_probs.exp_()
                grad_logits[torch.arange(len(target), device=target.device), safe_target] -= 1.0
                grad_logits *= keep[:, None]
                grad_hidden[start : start + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(flat.dtype)
                grad_weight += grad_logits.T @ rows.to(acc)
            del logits, log_probs
        ctx.save_for_backward(grad_hidden, grad_weight) if needs_grad else None
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = (grad_hidden * grad_output).reshape(ctx.hidden_shape) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum over supervised tokens of the cross-entropy of `hidden @ weight.T` (labels -100 ignored).

    Returns the SUM so callers can divide by the number of supervised tokens of the whole global
    batch (micro-batches, accumulation and ranks together), as the training spec requires.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
