"""The fused MoE kernels compute what the dispatcher's plain combine and dispatch backward compute:
the combine's output and the gradients of the expert rows and of the router weights, and the
gradient of the tokens through the dispatch (the sum of each token's K slot gradients), in fp32
and bf16, for top-2 and top-3 and a hidden size of more than one block; with dropped slots the
plain path runs; the kernels pass torch's custom-op checks."""

import pytest
import torch

from megamoe.model.moe.dispatcher import TokenDispatcher
from megamoe.parallel.state import single_rank_layout
from tests.kernels.interpreted import BF16, DEVICE, FP32, fused_here, kernel_module

kernel_module("moe")
TOKENS, EXPERTS = 12, 4


def _routing(topk, hidden, dtype, keep_fraction=1.0):
    g = torch.Generator().manual_seed(topk)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:topk] for _ in range(TOKENS)]).to(DEVICE)
    keep = None if keep_fraction == 1.0 else (torch.rand(TOKENS, topk, generator=g) < keep_fraction).to(DEVICE)
    x = torch.randn(TOKENS, hidden, generator=g).to(DEVICE, dtype)
    weights = torch.softmax(torch.randn(TOKENS, topk, generator=g), dim=-1).to(DEVICE)
    return ids, keep, x, weights


def _step(fused, ids, keep, x, weights):
    """dispatch -> a stand-in expert (times 1 + row index / 10) -> combine; the output and the
    gradients of x and of the weights."""
    dispatcher = TokenDispatcher(single_rank_layout(), num_experts=EXPERTS, ep_size=1, fused_kernels=fused)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    plan = dispatcher.plan(ids, keep)
    rows = dispatcher.dispatch(x, plan)
    scale = 1 + torch.arange(rows.shape[0], device=DEVICE, dtype=rows.dtype).unsqueeze(-1) / 10
    out = dispatcher.combine(rows * scale, weights, plan)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, out.dtype)
    return out, *torch.autograd.grad(out, (x, weights), grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk,hidden", [(2, 40), (3, 1100)])
def test_fused_combine_and_dispatch_backward_match_the_plain_ones(dtype, topk, hidden):
    routing = _routing(topk, hidden, dtype)
    plain = _step(False, *routing)
    with fused_here():
        fused = _step(True, *routing)
    assert fused[0].grad_fn.name() != plain[0].grad_fn.name(), "the fused path did not run"
    tol = FP32 if dtype == torch.float32 else BF16
    for p, f in zip(plain, fused):
        assert f.dtype == p.dtype
        torch.testing.assert_close(f, p, **tol)


def test_with_dropped_slots_the_plain_combine_runs():
    routing = _routing(2, 8, torch.float32, keep_fraction=0.6)
    with fused_here():
        out = _step(True, *routing)[0]
    assert out.grad_fn.name() == "_WeightedCombineBackward"


def test_fused_moe_kernels_pass_the_custom_op_checks():
    y = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    weights = torch.rand(3, 2, device=DEVICE, requires_grad=True)
    slot_rows = torch.randperm(6, device=DEVICE)
    torch.library.opcheck(torch.ops.megamoe.moe_combine, (y, weights, slot_rows, 2))
    torch.library.opcheck(torch.ops.megamoe.moe_combine, (y.detach(), None, slot_rows, 2))
    torch.library.opcheck(torch.ops.megamoe.moe_combine_backward,
                          (torch.randn(3, 5, device=DEVICE), y.detach(), weights.detach(), slot_rows))
