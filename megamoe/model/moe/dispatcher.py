"""All-to-all token dispatch over a layer's expert-parallel (EP) group, and the way back.

Shapes: ``T`` tokens of this rank, ``K`` top-k, ``S = T * K`` token-slots, ``H`` hidden,
``E`` experts, ``L = E / EP`` local experts, ``N`` rows this rank's experts receive.

    plan     : sort the kept token-slots by global expert id (one argsort), count them per
               expert, exchange the counts in the EP group, read the split sizes to the host
               (the only host sync of the layer)
    dispatch : x_TH -> x_send [kept slots, H] (expert-major) -> all_to_all -> [N, H] ordered
               by (source rank, local expert) -> reorder to local-expert-major for the GEMMs
    combine  : y_NH -> undo the reorder -> all_to_all back (swapped splits) -> rows to the slot
               positions (a gather by the inverse of ``order``; dropped slots stay zero) ->
               weighted sum over the K slots -> [T, H]  (``_WeightedCombine``)

When no slot is dropped and ``megamoe.kernels.use_fused`` allows it (CUDA, Triton), the weighted
combine and the backward's sum over a token's K slots run as one Triton kernel each
(``megamoe.kernels.moe``) instead of a gather to the slots and separate products and sums.

Global expert ``e`` lives on EP rank ``e // L`` as local expert ``e % L``, so the chunk of
the expert-sorted slots going to rank ``r`` is simply experts ``r*L .. r*L + L - 1``.

Without sequence parallelism (ETP = TP) every TP rank runs this with the same tokens and the
same routing, in its own EP group (EP groups are made of ranks with one TP rank), and gets its
TP shard's partial expert outputs back; the caller sums them over TP once, after ``combine``.

With sequence parallelism every rank routes its own tokens, so each token crosses the
all-to-all once.  Experts sharded over ETP > 1 ranks need the same rows on every ETP rank: after
the all-to-all, the rows of the ETP group are gathered (``N`` counts the rows of all of them,
ordered (ETP source, EP source, local expert) before the reorder), and the partial outputs are
summed back to the rank that received each row (a reduce-scatter) before the all-to-all back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe import kernels
from megamoe.model.moe.router import count_per_expert
from megamoe.parallel.mappings import flat_collective
from megamoe.parallel.state import ParallelState


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
    )
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; the backward sends the gradients back with swapped splits."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Rows ``x[sum(send_splits[:r]) : ...]`` go to rank r of ``group``; returns the
    ``sum(recv_splits)`` rows received, ordered by source rank.  Differentiable."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def _gather_rows(x: torch.Tensor, splits: list[int], group) -> torch.Tensor:
    """Every rank of ``group`` gets the rows of all ranks (``splits[r]`` from rank r), in rank order."""
    mine = x.shape[0]
    return _all_to_all(x.repeat(len(splits), 1), [mine] * len(splits), splits, group)


def _reduce_scatter_rows(y: torch.Tensor, splits: list[int], rank: int, group) -> torch.Tensor:
    """Adjoint of ``_gather_rows``: each rank gets the sum over the group of its own rows,
    added in rank order (deterministic)."""
    size, mine = len(splits), splits[rank]
    received = _all_to_all(y, splits, [mine] * size, group)
    return received.view(size, mine, *y.shape[1:]).sum(dim=0)


class _GatherRows(torch.autograd.Function):
    """Uneven all-gather of rows over a group; the backward is the reduce-scatter."""

    @staticmethod
    def forward(ctx, x, splits, rank, group):
        ctx.splits, ctx.rank, ctx.group = splits, rank, group
        return _gather_rows(x, splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.splits, ctx.rank, ctx.group), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    """Uneven reduce-scatter of rows over a group; the backward is the all-gather."""

    @staticmethod
    def forward(ctx, y, splits, rank, group):
        ctx.splits, ctx.group = splits, group
        return _reduce_scatter_rows(y, splits, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.splits, ctx.group), None, None, None


@dataclass
class DispatchPlan:
    """Where each kept token-slot goes; built by ``TokenDispatcher.plan`` for one forward."""

    num_tokens: int
    topk: int
    order: torch.Tensor  # [kept] int64: slot indices (t * K + j) of the kept slots, expert-major
    slot_rows: torch.Tensor | None  # [S] int64: the row of ``order`` holding each slot; None when slots are dropped
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    expert_counts: list[int]  # [L] rows each local expert computes (host copy)
    expert_offsets: torch.Tensor  # [L] int32 cumulative ``expert_counts`` (torch._grouped_mm's offs)
    etp_splits: list[int] | None  # rows each ETP rank received (gathered over ETP), None: no gather
    to_expert_major: torch.Tensor | None  # [N] permutation (source-major -> expert-major), None if identity
    from_expert_major: torch.Tensor | None  # its inverse


class _GatherSlots(torch.autograd.Function):
    """``x_TH`` rows of the token of each slot in ``order`` (slot = t * K + j).

    The backward of a plain ``index_select`` adds a token's K slot gradients with atomics, whose
    order (so whose rounding) varies from run to run on CUDA once K > 2.  Here each slot's gradient
    is written to its own row (slots are unique) and the K rows of a token are summed in slot
    order: the same bits every run, for any K.  ``fused`` (no slot dropped): one kernel reads the
    K rows of each token and writes their sum.
    """

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, order: torch.Tensor, slot_rows: torch.Tensor | None, topk: int,
                fused: bool):
        ctx.save_for_backward(order, slot_rows)
        ctx.topk, ctx.fused = topk, fused
        ctx.num_tokens = x_TH.shape[0]
        return x_TH.index_select(0, torch.div(order, topk, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):
        order, slot_rows = ctx.saved_tensors
        if ctx.fused:
            from megamoe.kernels.moe import sum_slots

            return sum_slots(grad_NH, slot_rows, ctx.topk), None, None, None, None
        grad_SH = _rows_to_slots(grad_NH, order, slot_rows, ctx.num_tokens * ctx.topk)
        return grad_SH.view(ctx.num_tokens, ctx.topk, -1).sum(dim=1), None, None, None, None


def _rows_to_slots(rows_NH: torch.Tensor, order: torch.Tensor, slot_rows: torch.Tensor | None,
                   num_slots: int) -> torch.Tensor:
    """``[S, H]``: row ``i`` of ``rows_NH`` at slot ``order[i]``, zero at dropped slots.  Every slot
    is written once (no atomics): a gather by ``slot_rows`` when no slot is dropped, else a copy
    into zeros."""
    if slot_rows is not None:
        return rows_NH.index_select(0, slot_rows)
    return rows_NH.new_zeros(num_slots, rows_NH.shape[-1]).index_copy_(0, order, rows_NH)


class _WeightedCombine(torch.autograd.Function):
    """``out_TH = sum_j weights_TK[t, j] * y(slot t * K + j)`` in fp32, returned in ``y_NH``'s dtype.

    The same numbers as moving the rows to their slots, casting them to fp32, multiplying by the
    weights, summing over K and casting back, in fewer passes: the fp32 copy of the rows is never
    made (the product promotes), and the backward writes the rows' gradient in their dtype
    directly (one rounding of the same fp32 product) and saves the rows, not their fp32 copy.
    """

    @staticmethod
    def forward(ctx, y_NH, weights_TK, order, slot_rows):
        num_tokens, topk = weights_TK.shape
        y_TKH = _rows_to_slots(y_NH, order, slot_rows, num_tokens * topk).view(num_tokens, topk, -1)
        ctx.save_for_backward(y_TKH, weights_TK, order)
        return torch.mul(y_TKH, weights_TK.unsqueeze(-1)).sum(dim=1).to(y_NH.dtype)

    @staticmethod
    def backward(ctx, grad_TH):
        y_TKH, weights_TK, order = ctx.saved_tensors
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_TKH = torch.empty_like(y_TKH)
            torch.mul(grad_TH.unsqueeze(1), weights_TK.unsqueeze(-1), out=grad_TKH)
            grad_y = grad_TKH.view(-1, y_TKH.shape[-1]).index_select(0, order)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.mul(grad_TH.float().unsqueeze(1), y_TKH).sum(dim=-1)
        return grad_y, grad_weights, None, None


class TokenDispatcher:
    """Moves token-slots between ``layout``'s rank and the ranks of its EP group (of size
    ``ep_size``) holding their experts, and with sequence parallelism and ETP > 1 across the
    ETP group; ``fused_kernels``: the combine and the dispatch's backward as Triton kernels where
    ``kernels.use_fused`` allows them."""

    def __init__(self, layout: ParallelState, *, num_experts: int, ep_size: int, fused_kernels: bool = True) -> None:
        assert num_experts % ep_size == 0, (num_experts, ep_size)
        self.layout = layout
        self.fused_kernels = fused_kernels
        self.groups = layout.experts(ep_size)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.local_experts = num_experts // ep_size
        self.gathers_etp = layout.sequence_parallel and self.groups.etp_size > 1

    def _group(self):
        return self.groups.ep_group

    def plan(self, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> DispatchPlan:
        """Sort the kept slots by expert and agree on the split sizes with the EP group.

        ``keep_TK`` (capacity mode) marks the slots that are sent; None keeps all of them.
        Collective over the EP group (all ranks of it must call), one host sync.
        """
        num_tokens, topk = expert_ids_TK.shape
        ep, num_local, num_experts = self.ep_size, self.local_experts, self.num_experts
        slot_expert_S = expert_ids_TK.reshape(-1)
        if keep_TK is not None:
            # Dropped slots get the sentinel id E: they sort after every kept slot and are cut off.
            slot_expert_S = slot_expert_S.masked_fill(~keep_TK.reshape(-1), num_experts)
        order_S = torch.argsort(slot_expert_S, stable=True)
        send_counts_E = count_per_expert(slot_expert_S, num_experts + 1)[:num_experts]
        recv_counts_E = send_counts_E
        if ep > 1:
            # Rank r receives counts [r*L, (r+1)*L) from each source: recv_counts viewed [EP, L].
            recv_counts_E = torch.empty_like(send_counts_E)
            dist.all_to_all_single(recv_counts_E, send_counts_E, group=self._group())
        etp = self.groups.etp_size if self.gathers_etp else 1
        recv_counts_all = recv_counts_E  # [ETP sources x] [EP sources x L local experts]
        if etp > 1:
            recv_counts_all = torch.empty(etp * num_experts, dtype=recv_counts_E.dtype, device=recv_counts_E.device)
            all_gather = flat_collective("all_gather_single", "all_gather_into_tensor")
            all_gather(recv_counts_all, recv_counts_E, group=self.groups.etp_group)
        counts = torch.cat([send_counts_E, recv_counts_all]).tolist()  # the host sync
        send, recv_all = counts[:num_experts], counts[num_experts:]
        recv = recv_all[self.groups.etp_rank * num_experts :][:num_experts] if etp > 1 else recv_all
        send_splits = [sum(send[r * num_local : (r + 1) * num_local]) for r in range(ep)]
        recv_splits = [sum(recv[r * num_local : (r + 1) * num_local]) for r in range(ep)]
        sources = etp * ep
        expert_counts = [sum(recv_all[r * num_local + e] for r in range(sources)) for e in range(num_local)]
        etp_splits = [sum(recv_all[t * num_experts : (t + 1) * num_experts]) for t in range(etp)] if etp > 1 else None
        recv_counts_RL = recv_counts_all.view(sources, num_local)
        kept = sum(send_splits)
        slot_rows = None
        if kept == order_S.numel():  # no slot dropped: order is a permutation of the slots
            slot_rows = torch.empty_like(order_S)
            slot_rows[order_S] = torch.arange(kept, device=order_S.device)
        to_expert_major = from_expert_major = None
        if sources > 1 and num_local > 1:
            num_recv = sum(expert_counts)
            local_ids = torch.arange(num_local, device=slot_expert_S.device).repeat(sources)
            row_expert_N = torch.repeat_interleave(local_ids, recv_counts_RL.reshape(-1), output_size=num_recv)
            to_expert_major = torch.argsort(row_expert_N, stable=True)
            from_expert_major = torch.empty_like(to_expert_major)
            from_expert_major[to_expert_major] = torch.arange(num_recv, device=slot_expert_S.device)
        return DispatchPlan(
            num_tokens=num_tokens,
            topk=topk,
            order=order_S[:kept],
            slot_rows=slot_rows,
            send_splits=send_splits,
            recv_splits=recv_splits,
            expert_counts=expert_counts,
            expert_offsets=recv_counts_RL.sum(dim=0).cumsum(dim=0).to(torch.int32),
            etp_splits=etp_splits,
            to_expert_major=to_expert_major,
            from_expert_major=from_expert_major,
        )

    def dispatch(self, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``[T, H]`` -> ``[N, H]`` rows for this rank's experts, local-expert-major
        (``plan.expert_counts`` rows per local expert)."""
        fused = plan.slot_rows is not None and kernels.use_fused("moe", self.fused_kernels, x_TH)
        x_recv = _GatherSlots.apply(x_TH, plan.order, plan.slot_rows, plan.topk, fused)
        if self.ep_size > 1:
            x_recv = all_to_all(x_recv, plan.send_splits, plan.recv_splits, self._group())
        if plan.etp_splits is not None:
            x_recv = _GatherRows.apply(x_recv, plan.etp_splits, self.groups.etp_rank, self.groups.etp_group)
        if plan.to_expert_major is not None:
            x_recv = x_recv.index_select(0, plan.to_expert_major)
        return x_recv

    def combine(self, y_NH: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs ``[N, H]`` (as ``dispatch`` laid them out) -> ``[T, H]``:
        ``out_t = sum_j weights[t, j] * y(slot t*K + j)``, dropped slots counting zero.
        The weighted sum runs in fp32; the result has ``y_NH``'s dtype."""
        if plan.from_expert_major is not None:
            y_NH = y_NH.index_select(0, plan.from_expert_major)
        if plan.etp_splits is not None:
            y_NH = _ReduceScatterRows.apply(y_NH, plan.etp_splits, self.groups.etp_rank, self.groups.etp_group)
        if self.ep_size > 1:
            y_NH = all_to_all(y_NH, plan.recv_splits, plan.send_splits, self._group())
        if plan.slot_rows is not None and kernels.use_fused("moe", self.fused_kernels, y_NH):
            from megamoe.kernels.moe import combine

            return combine(y_NH, weights_TK, plan.slot_rows)
        return _WeightedCombine.apply(y_NH, weights_TK, plan.order, plan.slot_rows)
