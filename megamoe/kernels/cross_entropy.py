"""Softmax cross entropy over a vocabulary shard in two passes over the logits (Triton), for
``megamoe.parallel.cross_entropy``.

``row_stats(logits [R, V], target [R], vocab_start, valid)`` -> fp32 ``[R]`` each: the row's max
over its first ``valid`` columns (the rest is vocabulary padding, no class), the sum of
``exp(logit - max)`` over them, and the logit of the target (id ``vocab_start + column``), 0 where
the target lies outside the shard.  One read of the logits (an online softmax).

``logits_grad(logits, target, lse [R], scale [R], vocab_start, valid)`` -> ``[R, V]`` in the
logits' dtype: ``(exp(logit - lse) - onehot(target)) * scale``, 0 in the padding columns, computed
in fp32 and rounded once.  One read of the logits, one write.

Neither is differentiable: the callers are autograd Functions with their own backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 4096


@triton.jit
def _row_stats_kernel(logits_ptr, target_ptr, max_ptr, sum_ptr, target_logit_ptr, row_stride, width, valid,
                      vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # a block of padding only leaves the max at -inf: no exp(-inf - -inf)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    local = tl.load(target_ptr + row) - vocab_start
    inside = (local >= 0) & (local < width)
    target_logit = tl.load(base + tl.where(inside, local, 0), mask=inside, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, running_max)
    tl.store(sum_ptr + row, running_sum)
    tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _logits_grad_kernel(logits_ptr, target_ptr, lse_ptr, scale_ptr, grad_ptr, row_stride, width, valid,
                        vocab_start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < valid, other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    local = tl.load(target_ptr + row) - vocab_start
    grad = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
    tl.store(grad_ptr + row * width + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=cols < width)


def _block(width: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(width, 1)))


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    assert logits.dim() == 2 and logits.stride(-1) == 1, (logits.shape, logits.stride())
    assert target.shape == logits.shape[:1] and target.is_contiguous(), (target.shape, logits.shape)


@torch.library.custom_op("megamoe::cross_entropy_stats", mutates_args=())
def _row_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
               valid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(logits, target)
    rows, width = logits.shape
    out = [logits.new_empty(rows, dtype=torch.float32) for _ in range(3)]
    if rows:
        _row_stats_kernel[(rows,)](logits, target, *out, logits.stride(0), width, valid, vocab_start,
                                   BLOCK=_block(valid))
    return tuple(out)


@_row_stats.register_fake
def _(logits, target, vocab_start, valid):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("megamoe::cross_entropy_logits_grad", mutates_args=())
def _logits_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 vocab_start: int, valid: int) -> torch.Tensor:
    _check(logits, target)
    assert lse.is_contiguous() and scale.is_contiguous() and lse.dtype == scale.dtype == torch.float32
    rows, width = logits.shape
    grad = logits.new_empty(logits.shape)
    if grad.numel():
        block = _block(width)
        _logits_grad_kernel[(rows, triton.cdiv(width, block))](logits, target, lse, scale, grad, logits.stride(0),
                                                              width, valid, vocab_start, BLOCK=block)
    return grad


@_logits_grad.register_fake
def _(logits, target, lse, scale, vocab_start, valid):
    return logits.new_empty(logits.shape)


def row_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, valid: int):
    """``(max, sum_exp, target_logit)`` of each row of ``logits [..., V]`` (module docstring), shaped ``[...]``."""
    flat = logits.reshape(-1, logits.shape[-1])
    stats = _row_stats(flat, target.reshape(-1).contiguous(), vocab_start, valid)
    return tuple(s.view(logits.shape[:-1]) for s in stats)


def logits_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                vocab_start: int, valid: int) -> torch.Tensor:
    """d loss / d logits ``[..., V]`` in the logits' dtype (module docstring); ``lse`` and ``scale`` ``[...]`` fp32."""
    flat = logits.reshape(-1, logits.shape[-1])
    grad = _logits_grad(flat, target.reshape(-1).contiguous(), lse.reshape(-1).contiguous(),
                        scale.reshape(-1).contiguous(), vocab_start, valid)
    return grad.view(logits.shape)
