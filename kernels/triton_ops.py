"""Triton kernels for RMSNorm, SwiGLU and rotary embeddings, forward and backward.

Each op is an autograd Function over Triton kernels, with the pure-PyTorch computation it must
equal beside it (`*_reference`, written exactly as transformers' Llama modules compute it).
The kernels do their arithmetic in fp32 whatever the storage dtype, and round once on store.

Importing this module imports triton. Whether the kernels are compiled for the GPU or run by
Triton's interpreter (numpy, on CPU tensors) is decided by `TRITON_INTERPRET=1`, which must be in
the environment before triton is first imported (`@triton.jit` reads it at decoration time, for
triton's own library functions too); `INTERPRETED` records whether it was.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

try:
    _INTERPRET_ASKED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs module
    _INTERPRET_ASKED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's own library functions (tl.sum, tl.sigmoid, ...) are jit functions too, decorated when
# triton was first imported: the interpreter works only if TRITON_INTERPRET=1 was set by then.
# (torch._dynamo, hence `import transformers`'s model classes, imports triton when it is installed.)
_STDLIB_INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"
INTERPRETED = _INTERPRET_ASKED and _STDLIB_INTERPRETED
INTERPRET_TOO_LATE = _INTERPRET_ASKED and not _STDLIB_INTERPRETED

_ELEMENTWISE_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# references: transformers' LlamaRMSNorm.forward, LlamaMLP's act_fn(gate) * up, apply_rotary_pos_emb


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------------------------
# RMSNorm: y = w * round_to_input_dtype(x * rsqrt(mean(x^2) + eps))


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    live = rows < n_rows
    mask = live[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + (rows * stride_x)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # transformers rounds the normalised row to the input dtype before the weight multiply.
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = (w[None, :] * normed).to(Y.dtype.element_ty)
    tl.store(Y + (rows * stride_y)[:, None] + cols[None, :], y, mask=mask)
    tl.store(RSTD + rows, rstd, mask=live)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, tiles_per_program,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks a contiguous run of row tiles and keeps its own partial weight gradient;
    # the partials are summed on the host (one row of fp32 per program).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = rows < n_rows
        mask = live[:, None] & col_mask[None, :]
        x = tl.load(X + (rows * stride_x)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + (rows * stride_dy)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=live, other=0.0)[:, None]
        normed = x * rstd
        dyw = dy * w[None, :]
        dx = rstd * (dyw - normed * (tl.sum(dyw * normed, axis=1) / n_cols)[:, None])
        tl.store(DX + (rows * stride_dx)[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * normed.to(X.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)


def _rows_per_tile(block: int) -> int:
    """Rows per program for row-wise kernels: about 4K elements per tile (one row if wider)."""
    return max(1, min(64, 4096 // block))


def _programs(n_tiles: int, device: torch.device) -> int:
    """Programs for a reduction over tiles: a few per GPU multiprocessor; few for the interpreter,
    which runs programs one after another."""
    if device.type == "cuda":
        return max(1, min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 2))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        rows = _rows_per_tile(block)
        if n_rows:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps, ROWS=rows, BLOCK=block
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(*shape[:-1], n_cols)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(n_cols)
        rows = _rows_per_tile(block)
        n_tiles = triton.cdiv(n_rows, rows)
        programs = _programs(n_tiles, x2.device)
        dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[(programs,)](
                dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                triton.cdiv(n_tiles, programs), ROWS=rows, BLOCK=block,
            )
        return dx.reshape(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm computes it, with Triton forward and backward."""
    return _RMSNorm.apply(x, weight, eps)


# --------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](gate, up, y, n, BLOCK=_ELEMENTWISE_BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_ELEMENTWISE_BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, with Triton forward and backward."""
    return _SwiGLU.apply(gate, up)


# --------------------------------------------------------------------------------------------
# RoPE: x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1).
# Backward is the transpose: dx1 = dy1 * cos1 + dy2 * sin2, dx2 = dy2 * cos2 - dy1 * sin1.


@triton.jit
def _rope(
    X, COS, SIN, Y, n_rows, n_heads, seq_len, sxb, sxh, sxs, scb, sch, scs, half,
    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # A tile of ROWS (batch, head, position) rows × half the head dim; rows are numbered in the
    # contiguous [B, H, S] order of Y, X and cos/sin are addressed through their strides.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < half)[None, :]
    s = rows % seq_len
    h = (rows // seq_len) % n_heads
    b = rows // (seq_len * n_heads)
    x_off = (b * sxb + h * sxh + s * sxs)[:, None] + cols[None, :]
    c_off = (b * scb + h * sch + s * scs)[:, None] + cols[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_off + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_off + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_off = (rows * (2 * half))[:, None] + cols[None, :]
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + half, y2.to(Y.dtype.element_ty), mask=mask)


def _launch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, seq, dim = x.shape
    y = torch.empty((batch, heads, seq, dim), dtype=x.dtype, device=x.device)
    n_rows = batch * heads * seq
    block = triton.next_power_of_2(dim // 2)
    rows = _rows_per_tile(block)
    if n_rows:
        _rope[(triton.cdiv(n_rows, rows),)](
            x, cos, sin, y, n_rows, heads, seq, x.stride(0), x.stride(1), x.stride(2),
            cos.stride(0), cos.stride(1), cos.stride(2), dim // 2,
            BACKWARD=backward, ROWS=rows, BLOCK=block,
        )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int):
        if x.ndim != 4 or x.shape[-1] % 2:
            raise ValueError(f"rope expects [batch, heads, seq, even head_dim] (or seq/heads swapped), got {tuple(x.shape)}")
        # Lay the 4-d problem out as [B, H, S, D] whatever the caller's order, cos/sin broadcast
        # by stride 0 (no copy), both with the same strides.
        swap = unsqueeze_dim == 2  # x is [B, S, H, D]
        xv = x.transpose(1, 2) if swap else x
        cos4 = cos.unsqueeze(unsqueeze_dim).contiguous()
        sin4 = sin.unsqueeze(unsqueeze_dim).contiguous()
        if swap:
            cos4, sin4 = cos4.transpose(1, 2), sin4.transpose(1, 2)
        cos4, sin4 = cos4.expand(xv.shape), sin4.expand(xv.shape)
        ctx.save_for_backward(cos4, sin4)
        ctx.swap = swap
        y = _launch_rope(xv, cos4, sin4, backward=False)
        return y.transpose(1, 2) if swap else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        cos4, sin4 = ctx.saved_tensors
        dyv = dy.transpose(1, 2) if ctx.swap else dy
        dx = _launch_rope(dyv, cos4, sin4, backward=True)
        return (dx.transpose(1, 2) if ctx.swap else dx), None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` with Triton forward and
    backward (no gradient for cos/sin: they come from position ids)."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}")
    return _Rope.apply(q, cos, sin, unsqueeze_dim), _Rope.apply(k, cos, sin, unsqueeze_dim)
