"""Autograd-aware collectives over the tensor-parallel group of a layout (Megatron's f/g operators),
and their sequence-parallel counterparts.

===========================  ==============================  ==============================
function                     forward                         backward
===========================  ==============================  ==============================
copy_to_tp_region            identity                        all-reduce (sum) over TP
reduce_from_tp_region        all-reduce (sum) over TP        identity
gather_from_tp_region        all-gather last dim             keep this rank's slice
gather_from_sp_region        all-gather the sequence dim     reduce-scatter the sequence dim
reduce_scatter_to_sp_region  reduce-scatter the sequence     all-gather the sequence dim
===========================  ==============================  ==============================

Each takes the ``ParallelState`` whose TP group it uses (``copy_to_group`` any group).  With
group size 1 each is the identity and launches nothing (so a layout built without process
groups runs at TP 1).  ``tp_input`` / ``tp_output`` pick the plain or the sequence-parallel
operator by ``layout.sequence_parallel``: they are what the TP layers call.

Sequence parallelism: activations ``[b, s, h]`` outside the TP GEMMs hold this TP rank's
``s / TP`` positions (rank t: positions ``[t * s / TP, (t + 1) * s / TP)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.state import ParallelState

SEQUENCE_DIM = 1


def flat_collective(new_name: str, old_name: str):
    """``torch.distributed.<new_name>`` where this torch has it, else ``<old_name>``: torch 2.13
    renamed the flat-tensor collectives (``reduce_scatter_tensor`` -> ``reduce_scatter_single``,
    ``all_gather_into_tensor`` -> ``all_gather_single``; the old names warn) and pyproject allows
    torch >= 2.4.  Looked up at call time so that wrappers (bench/) see every call."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def all_reduce_tp(x: torch.Tensor, layout: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``x`` over ``layout``'s TP group (nothing at TP size 1); returns it."""
    return _all_reduce(x, layout.tp_group, layout.tp_size, op)


def _all_reduce(x: torch.Tensor, group, size: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=group)
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


def _reduce_scatter_sequence(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """Sum over TP, keep this rank's sequence slice: ``[b, s, ...]`` -> ``[b, s / TP, ...]``."""
    x_sb = x.movedim(SEQUENCE_DIM, 0).contiguous()
    out = x_sb.new_empty((x_sb.shape[0] // layout.tp_size, *x_sb.shape[1:]))
    flat_collective("reduce_scatter_single", "reduce_scatter_tensor")(out, x_sb, group=layout.tp_group)
    return out.movedim(0, SEQUENCE_DIM)


def _gather_sequence(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return all_gather_cat(x, SEQUENCE_DIM, layout.tp_group, layout.tp_size)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group, ctx.size), None, None


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


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _gather_sequence(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_sequence(grad, ctx.layout), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _reduce_scatter_sequence(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad, ctx.layout), None


def copy_to_group(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Identity whose backward all-reduces the gradient over ``group`` (of ``size`` ranks)."""
    return _CopyToGroup.apply(x, group, size) if size > 1 else x


def copy_to_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return copy_to_group(x, layout.tp_group, layout.tp_size)


def reduce_from_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return _ReduceFromTP.apply(x, layout) if layout.tp_size > 1 else x


def gather_from_tp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    return _GatherFromTP.apply(x, layout) if layout.tp_size > 1 else x


def gather_from_sp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """``[b, s / TP, ...]`` -> ``[b, s, ...]`` (all-gather over TP); backward: reduce-scatter."""
    return _GatherFromSP.apply(x, layout) if layout.tp_size > 1 else x


def reduce_scatter_to_sp_region(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """``[b, s, ...]`` partial over TP -> ``[b, s / TP, ...]`` summed (reduce-scatter over TP);
    backward: all-gather.  The sequence length must be divisible by TP."""
    if layout.tp_size == 1:
        return x
    if x.shape[SEQUENCE_DIM] % layout.tp_size != 0:
        raise ValueError(
            f"--sequence-parallel: the sequence length {x.shape[SEQUENCE_DIM]} is not divisible by "
            f"--tensor-model-parallel-size {layout.tp_size}"
        )
    return _ReduceScatterToSP.apply(x, layout)


def tp_input(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """Entry into a column-parallel GEMM: the all-gather of the sequence with sequence
    parallelism, else ``copy_to_tp_region``."""
    return gather_from_sp_region(x, layout) if layout.sequence_parallel else copy_to_tp_region(x, layout)


def tp_output(x: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """Exit from a row-parallel GEMM (partial sums over TP): the reduce-scatter of the sequence
    with sequence parallelism, else ``reduce_from_tp_region``."""
    return reduce_scatter_to_sp_region(x, layout) if layout.sequence_parallel else reduce_from_tp_region(x, layout)
