"""The MoE combine, and the sum of a token's slot gradients, in one pass each (Triton), for
``megamoe.model.moe.dispatcher`` when no token-slot is dropped.

Shapes: ``T`` tokens, ``K`` top-k, ``N = T * K`` expert rows, ``H`` hidden; ``slot_rows [T * K]``
(int64): the row of ``y`` holding slot ``t * K + j``.

``combine(y [N, H], weights [T, K], slot_rows)`` -> ``[T, H]`` in y's dtype:
``out[t] = sum_j weights[t, j] * y[slot_rows[t K + j]]`` in fp32, rounded once.  Its backward
reads the output gradient, ``y`` and the weights once and writes ``grad_y[slot_rows[t K + j]] =
grad[t] * weights[t, j]`` (y's dtype) and ``grad_weights[t, j] = grad[t] . y[...]`` (fp32 sum).

``sum_slots(rows [N, H], slot_rows, K)`` -> ``[T, H]``: the same sum without weights (the
dispatch's backward: a token's K slot gradients added in slot order), not differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _combine_kernel(y_ptr, weights_ptr, slot_rows_ptr, out_ptr, hidden, TOPK: tl.constexpr, WEIGHTED: tl.constexpr,
                    BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(slot_rows_ptr + t * TOPK + j).to(tl.int64)
        y = tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(weights_ptr + t * TOPK + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(grad_ptr, y_ptr, weights_ptr, slot_rows_ptr, grad_y_ptr, grad_weights_ptr, hidden,
                             TOPK: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(TOPK):
        row = tl.load(slot_rows_ptr + t * TOPK + j).to(tl.int64)
        weight = tl.load(weights_ptr + t * TOPK + j).to(tl.float32)
        dot = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            grad = tl.load(grad_ptr + t * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row * hidden + cols, (grad * weight).to(grad_y_ptr.dtype.element_ty), mask=mask)
            dot += grad * y
        tl.store(grad_weights_ptr + t * TOPK + j, tl.sum(dot, axis=0))


def _block(hidden: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(hidden, 1)))


@torch.library.custom_op("megamoe::moe_combine", mutates_args=())
def _combine(y: torch.Tensor, weights: torch.Tensor | None, slot_rows: torch.Tensor, topk: int) -> torch.Tensor:
    assert y.dim() == 2 and y.is_contiguous() and slot_rows.is_contiguous(), (y.shape, y.stride())
    assert weights is None or (weights.is_contiguous() and weights.numel() == slot_rows.numel())
    tokens, hidden = slot_rows.numel() // topk, y.shape[1]
    out = y.new_empty(tokens, hidden)
    if out.numel():
        block = _block(hidden)
        _combine_kernel[(tokens, triton.cdiv(hidden, block))](
            y, y if weights is None else weights, slot_rows, out, hidden, TOPK=topk, WEIGHTED=weights is not None,
            BLOCK=block)
    return out


@_combine.register_fake
def _(y, weights, slot_rows, topk):
    return y.new_empty(slot_rows.shape[0] // topk, y.shape[1])


@torch.library.custom_op("megamoe::moe_combine_backward", mutates_args=())
def _combine_backward(grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                      slot_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert grad.is_contiguous() and y.is_contiguous() and weights.is_contiguous() and slot_rows.is_contiguous()
    grad_y = torch.empty_like(y)
    grad_weights = weights.new_empty(weights.shape, dtype=torch.float32)
    tokens, topk = weights.shape
    if tokens:
        _combine_backward_kernel[(tokens,)](grad, y, weights, slot_rows, grad_y, grad_weights, y.shape[1], TOPK=topk,
                                            BLOCK=_block(y.shape[1]))
    return grad_y, grad_weights


@_combine_backward.register_fake
def _(grad, y, weights, slot_rows):
    return torch.empty_like(y), weights.new_empty(weights.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    y, weights, slot_rows, _ = inputs
    ctx.save_for_backward(y, weights, slot_rows)


def _backward(ctx, grad: torch.Tensor):
    y, weights, slot_rows = ctx.saved_tensors
    assert weights is not None, "sum_slots is not differentiable"
    grad_y, grad_weights = _combine_backward(grad.contiguous(), y, weights, slot_rows)
    return grad_y, grad_weights.to(weights.dtype), None, None


_combine.register_autograd(_backward, setup_context=_setup_context)


def combine(y_NH: torch.Tensor, weights_TK: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` weighted sum over each token's K slots (module docstring); differentiable in
    ``y_NH`` and ``weights_TK``."""
    return _combine(y_NH.contiguous(), weights_TK.contiguous(), slot_rows, weights_TK.shape[1])


def sum_slots(rows_NH: torch.Tensor, slot_rows: torch.Tensor, topk: int) -> torch.Tensor:
    """``[T, H]``: ``sum_j rows_NH[slot_rows[t K + j]]`` in fp32, rounded once to rows' dtype."""
    return _combine(rows_NH.contiguous(), None, slot_rows, topk)
