"""vicuna_kernels: chunked linear cross-entropy equals the plain computation, values and gradients."""

import pytest
import torch

from vicuna_kernels import linear_cross_entropy, reference_linear_cross_entropy


def make(dtype, tokens=37, hidden=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens), generator=g)
    labels[0, :5] = -100  # a masked prompt
    labels[1, -3:] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_reference_in_float64(chunk):
    h, w, labels = make(torch.float64)
    ours = linear_cross_entropy(h, w, labels, chunk_size=chunk)
    gh, gw = torch.autograd.grad(ours * 0.5, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference_linear_cross_entropy(h2, w2, labels)
    rh, rw = torch.autograd.grad(ref * 0.5, (h2, w2))
    assert torch.allclose(ours, ref.to(ours.dtype), rtol=1e-6)
    assert torch.allclose(gh, rh, atol=1e-8)
    assert torch.allclose(gw, rw, atol=1e-8)


def test_bfloat16_is_close():
    h, w, labels = make(torch.bfloat16)
    ours = linear_cross_entropy(h, w, labels, chunk_size=16)
    ref = reference_linear_cross_entropy(h, w, labels)
    assert torch.allclose(ours, ref, rtol=2e-2)


def test_all_masked_gives_zero_loss_and_gradient():
    h, w, labels = make(torch.float32)
    labels[:] = -100
    loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_shape_mismatch_is_refused():
    h, w, labels = make(torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, labels[:, :-1])
