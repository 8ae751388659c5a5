"""The dispatcher's bookkeeping at EP=1 (no communication): rows come out expert-major with the
right counts, dropped slots are not sent, and combine is the weighted sum over the kept slots.
The all-to-all across EP ranks is covered by the parity tests."""

from __future__ import annotations

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


def test_slot_gather_backward_sums_each_tokens_slots_for_any_topk():
    tokens, topk, hidden = 6, 4, 3
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(tokens * topk)[: tokens * topk - 5]  # some slots dropped, the rest shuffled
    torch.autograd.gradcheck(lambda t: _GatherSlots.apply(t, order, topk), (x,))
    grad = torch.randn(len(order), hidden, dtype=torch.float64)
    (ours,) = torch.autograd.grad(_GatherSlots.apply(x, order, topk), x, grad)
    (plain,) = torch.autograd.grad(x.index_select(0, order // topk), x, grad)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
