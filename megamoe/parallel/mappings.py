"""Autograd-aware collectives over the tensor-parallel group (Megatron's f/g operators).

=========================  =======================  ==========================
function                   forward                  backward
=========================  =======================  ==========================
copy_to_tp_region          identity                 all-reduce (sum) over TP
reduce_from_tp_region      all-reduce (sum) over TP identity
gather_from_tp_region      all-gather last dim      keep this rank's slice
scatter_to_tp_region       keep this rank's slice   all-gather last dim
=========================  =======================  ==========================

With TP size 1 each is the identity and launches nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.state import get_parallel_state


def all_reduce_tp(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``x`` over the TP group (nothing at TP size 1); returns it."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=state.tp_group)
    return x


def all_gather_cat(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    """The ``size`` ranks' ``x`` of ``group`` concatenated along ``dim`` (``x`` itself at size 1)."""
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    state = get_parallel_state()
    return all_gather_cat(x, -1, state.tp_group, state.tp_size)


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    return x.chunk(state.tp_size, dim=-1)[state.tp_rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_tp(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_reduce_tp(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToTP.apply(x) if get_parallel_state().tp_size > 1 else x


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromTP.apply(x) if get_parallel_state().tp_size > 1 else x


def gather_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromTP.apply(x) if get_parallel_state().tp_size > 1 else x


def scatter_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToTP.apply(x) if get_parallel_state().tp_size > 1 else x
