"""SwiGLU ``silu(gate) * up`` on ``h = [..., gate f | up f]`` in one pass each way (Triton).

Forward reads ``h`` and writes the ``[..., f]`` output; backward reads the output's gradient and
``h`` and writes ``[..., 2f]``, recomputing the sigmoid (cheaper than keeping ``silu(gate)``).
``swiglu(h)`` is differentiable; ``h`` must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _forward_kernel(h_ptr, out_ptr, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(h_ptr + row * 2 * f + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * f + f + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * f + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_out_ptr, h_ptr, grad_h_ptr, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    dy = tl.load(grad_out_ptr + row * f + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * 2 * f + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * f + f + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    grad_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(g) / dg = s (1 + g (1 - s))
    grad_up = dy * gate * sig
    dtype = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + row * 2 * f + cols, grad_gate.to(dtype), mask=mask)
    tl.store(grad_h_ptr + row * 2 * f + f + cols, grad_up.to(dtype), mask=mask)


def _grid(h: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    f = h.shape[-1] // 2
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(f, 1)))
    return (h.numel() // max(2 * f, 1), triton.cdiv(f, block)), f, block


@torch.library.custom_op("megamoe::swiglu", mutates_args=())
def _swiglu(h: torch.Tensor) -> torch.Tensor:
    assert h.is_contiguous() and h.shape[-1] % 2 == 0, (h.shape, h.stride())
    out = h.new_empty((*h.shape[:-1], h.shape[-1] // 2))
    grid, f, block = _grid(h)
    if out.numel():
        _forward_kernel[grid](h, out, f, BLOCK=block)
    return out


@_swiglu.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("megamoe::swiglu_backward", mutates_args=())
def _swiglu_backward(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    assert grad_out.is_contiguous() and h.is_contiguous(), (grad_out.stride(), h.stride())
    grad_h = torch.empty_like(h)
    grid, f, block = _grid(h)
    if grad_h.numel():
        _backward_kernel[grid](grad_out, h, grad_h, f, BLOCK=block)
    return grad_h


@_swiglu_backward.register_fake
def _(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    (h,) = ctx.saved_tensors
    return _swiglu_backward(grad_out.contiguous(), h)


_swiglu.register_autograd(_backward, setup_context=_setup_context)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :f]) * h[..., f:]`` -> ``[..., f]`` in ``h``'s dtype, computed in fp32."""
    return _swiglu(h.contiguous())
