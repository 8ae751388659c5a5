"""Rotary position embedding (rotate-half convention, ``megamoe.model.rope``) in one pass each way
(Triton).

``rotary(x, cos, sin)``: ``x [b, heads, s, d]`` (any strides, the last dim contiguous), ``cos``
and ``sin`` ``[s, d]`` -> ``x * cos + [-x2 sin1, x1 sin2]`` (halves ``x1, x2`` of the last dim),
in x's dtype, computed in fp32, laid out position-major (``[b, s, heads, d]`` in memory, as the
QKV projection lays q and k out): flash attention's output then has the layout that lets the
attention's ``transpose(1, 2).reshape`` be a view instead of a copy.  Its backward is the rotation by minus the angle,
``g * cos + [g2 sin2, -g1 sin1]``, the same kernel.  Differentiable in ``x`` only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_ROWS = 16  # positions per program


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq, half,
                   x_stride_b, x_stride_h, x_stride_s, out_stride_b, out_stride_h, out_stride_s, table_stride_s,
                   INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    pos = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (pos < seq) & (d < half)
    x1_ptr = x_ptr + b * x_stride_b + h * x_stride_h + pos * x_stride_s + d
    x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptr + half, mask=mask, other=0.0).to(tl.float32)
    table = pos * table_stride_s + d
    cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        out1 = x1 * cos1 + x2 * sin2
        out2 = x2 * cos2 - x1 * sin1
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    out1_ptr = out_ptr + b * out_stride_b + h * out_stride_h + pos * out_stride_s + d
    dtype = out_ptr.dtype.element_ty
    tl.store(out1_ptr, out1.to(dtype), mask=mask)
    tl.store(out1_ptr + half, out2.to(dtype), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    assert x.dim() == 4 and x.shape[-1] % 2 == 0 and x.stride(-1) == 1, (x.shape, x.stride())
    assert cos.shape == sin.shape == (x.shape[2], x.shape[3]), (cos.shape, sin.shape, x.shape)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1, (cos.stride(), sin.stride())


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    """``[b, heads, s, d]`` stored as ``[b, s, heads, d]`` (module docstring)."""
    b, heads, seq, dim = x.shape
    return x.new_empty(b, seq, heads, dim).transpose(1, 2)


@torch.library.custom_op("megamoe::rotary", mutates_args=())
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    _check(x, cos, sin)
    out = _empty_out(x)
    b, heads, seq, dim = x.shape
    if out.numel():
        block_s = min(_MAX_ROWS, triton.next_power_of_2(seq))
        grid = (b * heads, triton.cdiv(seq, block_s))
        _rotary_kernel[grid](x, cos, sin, out, heads, seq, dim // 2, *x.stride()[:3], *out.stride()[:3],
                             cos.stride(0), INVERSE=inverse, BLOCK_S=block_s,
                             BLOCK_D=triton.next_power_of_2(dim // 2))
    return out


@_rotary.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _empty_out(x)


def _setup_context(ctx, inputs, output) -> None:
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, grad: torch.Tensor):
    cos, sin = ctx.saved_tensors
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    return _rotary(grad, cos, sin, not ctx.inverse), None, None, None


_rotary.register_autograd(_backward, setup_context=_setup_context)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [b, heads, s, d]`` rotated by position (module docstring); ``cos, sin`` ``[s, d]``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return _rotary(x, cos, sin, False)
