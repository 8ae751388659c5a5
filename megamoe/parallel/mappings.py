"""Autograd-aware collectives over the tensor-parallel group of a layout (Megatron's f/g operators).

=========================  =======================  ==========================
function                   forward                  backward
=========================  =======================  ==========================
copy_to_tp_region          identity                 all-reduce (sum) over TP
reduce_from_tp_region      all-reduce (sum) over TP identity
gather_from_tp_region      all-gather last dim      keep this rank's slice
=========================  =======================  ==========================

Each takes the ``ParallelState`` whose TP group it uses.  With TP size 1 each is the identity
and launches nothing (so a layout built without process groups runs at TP 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.state import ParallelState


def all_reduce_tp(x: torch.Tensor, layout: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``x`` over ``layout``'s TP group (nothing at TP size 1); returns it."""
    if layout.tp_size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=layout.tp_group)
    return x


def all_gather_cat(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    """The ``size`` ranks' ``x`` of ``group`` concatenated along ``dim`` (``x`` itself at size 1)."""
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split_last_dim(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return x.chunk(layout.tp_size, dim=-1)[layout.tp_rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_tp(grad.clone(), ctx.layout), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        return all_reduce_tp(x.clone(), layout)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return all_gather_cat(x, -1, layout.tp_group, layout.tp_size)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.layout), None


def copy_to_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return _CopyToTP.apply(x, layout) if layout.tp_size > 1 else x


def reduce_from_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return _ReduceFromTP.apply(x, layout) if layout.tp_size > 1 else x


def gather_from_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return _GatherFromTP.apply(x, layout) if layout.tp_size > 1 else x
