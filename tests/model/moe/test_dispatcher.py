"""The dispatcher's bookkeeping at EP=1 (no communication): rows come out expert-major with the
right counts, dropped slots are not sent, and combine is the weighted sum over the kept slots.
The all-to-all across EP ranks is covered by the parity tests."""

from __future__ import annotations

import pytest
import torch

from megamoe.model.moe.dispatcher import TokenDispatcher, _GatherSlots
from megamoe.parallel.state import single_rank_layout

TOKENS, TOPK, EXPERTS, HIDDEN = 10, 2, 4, 3
LAYOUT = single_rank_layout()


def _routing():
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOPK] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOPK, generator=gen)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    return ids, weights, x


def test_rows_are_grouped_by_expert_and_counted():
    ids, _, x = _routing()
    dispatcher = TokenDispatcher(LAYOUT, num_experts=EXPERTS, ep_size=1)
    plan = dispatcher.plan(ids, None)
    rows = dispatcher.dispatch(x, plan)
    want_counts = [int((ids == e).sum()) for e in range(EXPERTS)]
    assert plan.expert_counts == want_counts
    assert plan.expert_offsets.tolist() == list(torch.tensor(want_counts).cumsum(0))
    assert plan.expert_offsets.dtype == torch.int32
    for e, block in enumerate(rows.split(want_counts)):
        tokens_of_e = (ids == e).any(dim=1).nonzero().flatten()  # in token order
        assert torch.equal(block, x[tokens_of_e])


def test_dropped_slots_are_not_sent_and_combine_weights_the_kept_ones():
    ids, weights, x = _routing()
    keep = torch.rand(TOKENS, TOPK, generator=torch.Generator().manual_seed(1)) > 0.4
    dispatcher = TokenDispatcher(LAYOUT, num_experts=EXPERTS, ep_size=1)
    plan = dispatcher.plan(ids, keep)
    assert sum(plan.expert_counts) == int(keep.sum())
    rows = dispatcher.dispatch(x, plan)
    scale = torch.arange(1, EXPERTS + 1, dtype=x.dtype)  # "expert e" multiplies by e + 1
    expert_of_row = torch.repeat_interleave(torch.arange(EXPERTS), torch.tensor(plan.expert_counts))
    out = dispatcher.combine(rows * scale[expert_of_row].unsqueeze(-1), weights, plan)
    want = ((weights * keep * scale[ids]).sum(dim=1, keepdim=True)) * x
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dropped", [5, 0])
def test_slot_gather_backward_sums_each_tokens_slots_for_any_topk(dropped):
    tokens, topk, hidden = 6, 4, 3
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(tokens * topk)[: tokens * topk - dropped]  # some slots dropped, the rest shuffled
    slot_rows = torch.argsort(order) if not dropped else None
    torch.autograd.gradcheck(lambda t: _GatherSlots.apply(t, order, slot_rows, topk, False), (x,))
    grad = torch.randn(len(order), hidden, dtype=torch.float64)
    (ours,) = torch.autograd.grad(_GatherSlots.apply(x, order, slot_rows, topk, False), x, grad)
    (plain,) = torch.autograd.grad(x.index_select(0, order // topk), x, grad)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


def _plain_combine(y_NH, weights_TK, order):
    """The composition ``_WeightedCombine`` replaces: rows to their slots, fp32, weighted sum over K."""
    tokens, topk = weights_TK.shape
    y_SH = y_NH.new_zeros(tokens * topk, y_NH.shape[-1]).index_copy(0, order, y_NH)
    return (y_SH.view(tokens, topk, -1).float() * weights_TK.unsqueeze(-1)).sum(dim=1).to(y_NH.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_fraction", [1.0, 0.6])
def test_combine_gives_the_bits_of_the_plain_weighted_sum_forward_and_backward(dtype, keep_fraction):
    """Fewer passes, same numbers: the output and the gradients of the rows and of the weights
    are bitwise those of the plain composition, in bf16 and fp32, dropless and with drops."""
    tokens, topk, experts, hidden = 64, 2, 4, 48
    gen = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    keep = None if keep_fraction == 1.0 else torch.rand(tokens, topk, generator=gen) < keep_fraction
    plan = TokenDispatcher(LAYOUT, num_experts=experts, ep_size=1).plan(ids, keep)
    assert (plan.slot_rows is None) == (keep is not None)
    y = torch.randn(len(plan.order), hidden, generator=gen).to(dtype).requires_grad_()
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), dim=-1).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ours = TokenDispatcher(LAYOUT, num_experts=experts, ep_size=1).combine(y, weights, plan)
    plain = _plain_combine(y, weights, plan.order)
    assert torch.equal(ours, plain)
    got = torch.autograd.grad(ours, (y, weights), grad)
    want = torch.autograd.grad(plain, (y, weights), grad)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
