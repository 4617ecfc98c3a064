"""Triton RMSNorm, SwiGLU and RoPE against their PyTorch references, forward and backward, and
`apply_kernels` on a tiny HF Llama, all on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Not collected by the main test run: the interpreter only works if TRITON_INTERPRET=1 is set
before triton is first imported, and in a pytest session something (torch._dynamo, imported by
transformers' model classes) has usually imported it already. tests/test_kernels_triton.py runs
this file in a fresh `python -m pytest` with the variable set; running it directly works too.
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (direct runs)

import pytest  # noqa: E402
import torch  # noqa: E402

import vicuna_kernels  # noqa: E402
from vicuna_kernels import apply_kernels, kernel_plan  # noqa: E402
from vicuna_kernels import triton_ops  # noqa: E402

if not triton_ops.INTERPRETED:
    raise RuntimeError("these checks need TRITON_INTERPRET=1 in the environment before Python starts")


@pytest.fixture
def ops():
    return triton_ops


def _grads(out, inputs, seed=1):
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs)
    return torch.autograd.grad(outs, inputs, cot)


def _leaves(*tensors, dtype):
    return [t.to(dtype).detach().requires_grad_() for t in tensors]


def _check(op, reference, base, dtype):
    """op and reference on `base` (fp64 tensors) cast to dtype: fp32 within float rounding; bf16
    no further from the exact fp64 result than the bf16 reference is (plus one bf16 step)."""
    ours_in = _leaves(*base, dtype=dtype)
    ref_in = _leaves(*base, dtype=dtype)
    exact_in = _leaves(*base, dtype=torch.float64)
    ours, ref, exact = op(*ours_in), reference(*ref_in), reference(*exact_in)
    pairs = list(zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,),
                     exact if isinstance(exact, tuple) else (exact,)))
    pairs += list(zip(_grads(ours, ours_in), _grads(ref, ref_in), _grads(exact, exact_in)))
    for a, r, e in pairs:
        assert a.dtype == r.dtype and a.shape == r.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        else:
            ours_err = (a.double() - e).abs().max().item()
            ref_err = (r.double() - e).abs().max().item()
            assert ours_err <= ref_err + 2 ** -7 * e.abs().max().item(), (ours_err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(ops, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 24, generator=g, dtype=torch.float64)  # 210 rows: tiles of 64 + a partial one
    w = 1 + 0.3 * torch.randn(24, generator=g, dtype=torch.float64)
    _check(lambda a, b: ops.rms_norm(a, b, 1e-6), lambda a, b: ops.rms_norm_reference(a, b, 1e-6), (x, w), dtype)


def test_rms_norm_keeps_an_fp32_weight_fp32(ops):
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.ones(8, requires_grad=True)
    y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == ops.rms_norm_reference(x, w, 1e-5).dtype == torch.float32
    # The normalised row is rounded to bf16 before the fp32 multiply, as in transformers. Triton
    # 3.7's interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest): one bf16 step.
    torch.testing.assert_close(y, ops.rms_norm_reference(x, w, 1e-5), rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(ops, dtype):
    g = torch.Generator().manual_seed(0)
    gate = 3 * torch.randn(5, 7, 300, generator=g, dtype=torch.float64)  # 10500: not a block multiple
    up = torch.randn(5, 7, 300, generator=g, dtype=torch.float64)
    _check(ops.swiglu, ops.swiglu_reference, (gate, up), dtype)


def _cos_sin(batch, seq, dim, g):
    pos = torch.randint(0, 500, (batch, seq), generator=g).double()  # packed samples: arbitrary ids
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    emb = torch.cat((pos[..., None] * inv, pos[..., None] * inv), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bhsd-view", "bshd", "broadcast-batch"])
def test_rope_matches_reference(ops, dtype, layout):
    g = torch.Generator().manual_seed(0)
    batch, seq, dim = 2, 11, 12  # half-dim 6: masked lanes
    cos, sin = _cos_sin(1 if layout == "broadcast-batch" else batch, seq, dim, g)
    unsqueeze = 2 if layout == "bshd" else 1
    q = torch.randn(batch, seq, 4, dim, generator=g, dtype=torch.float64)  # GQA: 4 query heads,
    k = torch.randn(batch, seq, 2, dim, generator=g, dtype=torch.float64)  # 2 key heads
    if layout != "bshd":
        # HF's layout: a transposed view of the projection, not contiguous ("-view" keeps it so).
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if layout != "bhsd-view":
            q, k = q.contiguous(), k.contiguous()

    def op(q, k, c, s):
        return ops.rope(q, k, c, s, unsqueeze)

    def ref(q, k, c, s):
        return ops.rope_reference(q, k, c, s, unsqueeze)

    ours_in = _leaves(q, k, dtype=dtype)
    if layout == "bhsd-view":
        ours_in = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in ours_in]
        assert not ours_in[0].is_contiguous()
    c, s = cos.to(dtype), sin.to(dtype)
    _check(lambda a, b: op(a, b, c, s), lambda a, b: ref(a, b, c, s), (q, k), dtype)
    # and straight from a non-contiguous view
    out = op(*ours_in, c, s)
    torch.testing.assert_close(out, ref(*ours_in, c, s), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=2e-2)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _loss_and_grads(model, ids, position_ids=None):
    model.zero_grad()
    # use_cache=False as in training: with a cache, transformers 5 does not turn packed position
    # ids into per-sample attention (the loss then differs with and without checkpointing).
    out = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def calls(ops, monkeypatch):
    """Counts calls to the Triton ops (apply_kernels binds them at apply time)."""
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for name in counts:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return counts


@pytest.mark.parametrize("checkpointing", [False, True])
def test_apply_kernels_keeps_loss_and_gradients(ops, calls, checkpointing):
    model = _tiny_llama().train()
    patched = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 0, 1, 2, 3, 4, 5]])  # packed
    want_loss, want = _loss_and_grads(model, ids, position_ids)

    plan = kernel_plan(patched, "auto")
    assert plan.describe().startswith("kernels auto: Triton rms_norm ×5, swiglu ×2, rope ×2 (Triton ")
    assert "interpreter on cpu" in plan.reason
    assert apply_kernels(patched, "auto") == ["rms_norm", "swiglu", "rope"]
    if checkpointing:
        patched.activation_checkpointing_enable()
    loss, got = _loss_and_grads(patched, ids, position_ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # 5 norms, 2 MLPs, 2 attentions per forward; checkpointing runs the layers' forward twice
    again = 2 if checkpointing else 1
    assert calls == {"rms_norm": 1 + 4 * again, "swiglu": 2 * again, "rope": 2 * again}

    # another model in the same process is untouched (the RoPE dispatcher only fires for patched
    # attention modules), and "off" restores the patched one
    before = dict(calls)
    assert _loss_and_grads(model, ids, position_ids)[0] == want_loss
    assert apply_kernels(patched, "off") == []
    assert not any("forward" in m.__dict__ for m in patched.modules())
    _loss_and_grads(patched, ids, position_ids)
    assert calls == before


def test_only_llama_arithmetic_is_patched(ops):
    # Gemma's RMSNorm scales by (1 + weight) and its MLP uses gelu: neither may be replaced; its
    # rotary apply is Llama's and is.
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    )
    model = GemmaForCausalLM(config)
    plan = kernel_plan(model)
    assert plan.modules == {"rope": 1}, plan.describe()
    assert kernel_plan(torch.nn.Linear(4, 4)).describe() == (
        "kernels auto: no Triton ops (Linear has no Llama-style RMSNorm, SiLU MLP or rotary attention); "
        "fused linear+cross-entropy loss"
    )


def test_package_exports_the_triton_ops(ops):
    assert vicuna_kernels.rms_norm is ops.rms_norm and vicuna_kernels.rope_reference is ops.rope_reference
