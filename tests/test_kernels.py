"""vicuna_kernels: chunked linear cross-entropy equals the plain computation, values and gradients;
the kernel switch's plan on CPU. (Triton parity under the interpreter: test_kernels_triton.py.)"""

import pytest
import torch

from vicuna_cli.core.errors import VicunaError
from vicuna_kernels import cross_entropy
from vicuna_kernels import (
    apply_kernels,
    default_chunk_size,
    kernel_plan,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)


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


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bfloat16_is_close(monkeypatch, fast_bf16):
    # Both ways of forming the weight gradient: a bf16 matmul per chunk (GPUs, CPUs with native
    # bf16) and an fp32 one from the fp32 softmax gradient (other CPUs).
    monkeypatch.setattr(cross_entropy, "low_precision_gemm_is_fast", lambda device, dtype: fast_bf16)
    h, w, labels = make(torch.bfloat16, tokens=64, vocab=301)
    ours = linear_cross_entropy(h, w, labels, chunk_size=16)
    gh, gw = torch.autograd.grad(ours, (h, w))
    ref = reference_linear_cross_entropy(h, w, labels)
    rh, rw = torch.autograd.grad(ref, (h, w))
    exact = reference_linear_cross_entropy(h.double(), w.double(), labels)
    eh, ew = torch.autograd.grad(exact, (h, w))
    assert ours.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert torch.allclose(ours, ref, rtol=1e-4)
    # no further from the exact gradients than the plain bf16 computation (+ one bf16 step)
    for got, plain, want in ((gh, rh, eh), (gw, rw, ew)):
        ours_err = (got.double() - want).abs().max()
        plain_err = (plain.double() - want).abs().max()
        assert ours_err <= plain_err + 2**-8 * want.abs().max(), (ours_err, plain_err)


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


def test_zero_tokens_give_zero_loss_and_gradient():
    h = torch.zeros(0, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16)
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("bad", [101, -1, -5])
def test_out_of_range_labels_are_refused(bad):
    h, w, labels = make(torch.float32)
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=rf"labels must be -100 or in \[0, 101\); got \[{bad}\]"):
        linear_cross_entropy(h, w, labels, chunk_size=8)


def test_weight_that_fits_no_hidden_size_is_refused():
    h, w, labels = make(torch.float32)
    with pytest.raises(ValueError, match="does not fit a head weight"):
        linear_cross_entropy(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        linear_cross_entropy(h, w, labels, chunk_size=0)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_only_the_needed_gradient_is_computed(frozen):
    # LoRA freezes the head: the weight gradient (a vocab x hidden fp32 buffer) is then skipped.
    h, w, labels = make(torch.float64)
    (w if frozen == "weight" else h).requires_grad_(False)
    live = h if frozen == "weight" else w
    ours = linear_cross_entropy(h, w, labels, chunk_size=10)
    (g,) = torch.autograd.grad(ours, (live,))
    (r,) = torch.autograd.grad(reference_linear_cross_entropy(h, w, labels), (live,))
    assert torch.allclose(g, r, atol=1e-8)


def test_no_grad_evaluation_matches_and_tracks_nothing():
    h, w, labels = make(torch.float64)
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, labels, chunk_size=9)
    assert not ours.requires_grad
    assert torch.allclose(ours, reference_linear_cross_entropy(h, w, labels).detach(), rtol=1e-10)


def test_autocast_bf16_runs_in_bf16_and_returns_fp32_gradients():
    h, w, labels = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, labels, chunk_size=16)
    ours.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = reference_linear_cross_entropy(h.detach().bfloat16(), w.detach().bfloat16(), labels)
    assert torch.allclose(ours, ref, rtol=1e-3)


def test_backward_twice_is_refused_not_silently_doubled():
    # Backward scales the gradients computed in forward in place; a second pass would see them
    # already scaled, so autograd's saved-tensor check must stop it.
    h, w, labels = make(torch.float32)
    loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_full_logits_never_exist():
    # Record every tensor any op produces during forward + backward: none may be as large as the
    # [tokens x vocab] logits; the largest are one chunk of logits and the weight-sized gradient.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    tokens, vocab, hidden, chunk = 128, 300, 8, 16
    h, w, labels = make(torch.float32, tokens=tokens // 2, hidden=hidden, vocab=vocab)
    with Largest():
        linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()
    assert Largest.numel == chunk * vocab < tokens * vocab
    Largest.numel = 0
    with Largest():
        reference_linear_cross_entropy(h, w, labels).backward()
    assert Largest.numel == tokens * vocab  # the check sees the plain loss's logits


def test_default_chunk_is_a_fixed_logit_budget():
    assert default_chunk_size(49152) == 170
    assert default_chunk_size(32000) == 262
    assert default_chunk_size(10**9) == 16


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_plan_on_cpu_uses_no_triton_and_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _tiny_llama()
    plan = kernel_plan(model, "auto")
    assert plan.ops == () and plan.fused_loss
    assert plan.describe() == (
        "kernels auto: no Triton ops (the model is on cpu; the Triton kernels run on CUDA "
        "(or on CPU under TRITON_INTERPRET=1)); fused linear+cross-entropy loss"
    )
    assert apply_kernels(model, "auto") == []
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_plan_off_uses_nothing():
    plan = kernel_plan(_tiny_llama(), "off")
    assert (plan.ops, plan.fused_loss) == ((), False)
    assert plan.describe() == "kernels off: no Triton ops (--kernels off); plain loss"


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(VicunaError, match=r"unknown kernels mode 'fast'; known: auto, off") as err:
        kernel_plan(_tiny_llama(), "fast")
    assert "--kernels auto" in err.value.hint


def test_the_folder_does_not_shadow_the_hugging_face_kernels_package(tmp_path):
    """From a checkout's root (`python -m ...` puts it on sys.path) a bare `import kernels` must
    reach the Hugging Face package of that name (transformers >= 5.25 requires and imports it; the
    folder shadowed it and every model load failed); without that package, the folder itself (what
    transformers < 5.25 imports to read a version)."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import kernels, vicuna_kernels; print(kernels.__file__); print(vicuna_kernels.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(root / "kernels" / "__init__.py")] * 2
        return
    assert done.returncode == 0, done.stderr
    hf, ours = done.stdout.split()
    assert Path(ours) == root / "kernels" / "__init__.py"
    assert root / "kernels" not in Path(hf).parents  # the installed package, not this folder
