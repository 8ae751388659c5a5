"""The router: top-k choice and weights, the load-balancing and z losses (and their gradient
into the router weight), fp32 logits, and input jitter.  Single process: the router itself
communicates nothing."""

from __future__ import annotations

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.model.moe.aux_losses import load_balancing_loss
from megamoe.model.moe.router import TopKRouter
from megamoe.parallel.state import single_rank_layout
from tests.model.moe.reference import reference_routing

HIDDEN, EXPERTS, TOKENS = 16, 8, 32


def _router(dtype=torch.float32, **overrides) -> TopKRouter:
    fields = dict(vocab_size=16, num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, num_experts=EXPERTS,
                  moe_router_topk=2, swiglu=True, add_bias_linear=False)
    fields.update(overrides)
    router = TopKRouter(ModelConfig(**fields), EXPERTS, single_rank_layout(), dtype=dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(0)).to(router.weight))
    return router


def _tokens(dtype=torch.float32):
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_top_k_choice_and_weights_follow_the_softmax_order_option(pre_softmax):
    router = _router(moe_router_pre_softmax=pre_softmax, moe_router_topk=3)
    got = router(_tokens())
    ids, weights, _, _ = reference_routing(_tokens().double(), router.weight.detach().double(), topk=3,
                                           pre_softmax=pre_softmax)
    assert torch.equal(got.expert_ids, ids)
    torch.testing.assert_close(got.weights.double(), weights, rtol=1e-6, atol=1e-7)
    sums = got.weights.sum(-1)
    if not pre_softmax:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert (sums < 1).all()
    assert torch.equal(got.tokens_per_expert, torch.bincount(ids.flatten(), minlength=EXPERTS))


def test_logits_are_fp32_for_a_bf16_model():
    router = _router(torch.bfloat16)
    got = router(_tokens(torch.bfloat16))
    assert got.weights.dtype == torch.float32 and got.z_loss.dtype == torch.float32
    _, weights, _, logits = reference_routing(_tokens(torch.bfloat16).double(), router.weight.detach().double(),
                                              topk=2, pre_softmax=False)
    torch.testing.assert_close(got.weights.double(), weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.z_loss.double(), torch.logsumexp(logits, -1).pow(2).mean(), rtol=1e-5, atol=0)


def test_load_balancing_loss_is_one_for_uniform_routing_and_grows_with_imbalance():
    probs = torch.full((TOKENS, EXPERTS), 1.0 / EXPERTS)
    uniform = torch.full((EXPERTS,), TOKENS * 2 // EXPERTS)
    torch.testing.assert_close(load_balancing_loss(probs, uniform, 2), torch.tensor(1.0))
    skewed_probs = torch.zeros(TOKENS, EXPERTS)
    skewed_probs[:, :2] = 0.5
    skewed = torch.zeros(EXPERTS, dtype=torch.int64)
    skewed[:2] = TOKENS
    torch.testing.assert_close(load_balancing_loss(skewed_probs, skewed, 2), torch.tensor(EXPERTS / 2.0))


def test_aux_and_z_losses_reach_the_router_weight():
    """Back-propagating only the weighted auxiliary losses gives the router weight exactly the
    gradient of ``a * E * sum f_e P_e + b * mean(lse^2)`` (f fixed by the top-k), and it is not zero."""
    router = _router()
    routing = router(_tokens())
    (0.1 * routing.load_balancing_loss + 0.01 * routing.z_loss).backward()

    weight = router.weight.detach().double().requires_grad_()
    ids, _, probs, logits = reference_routing(_tokens().double(), weight, topk=2, pre_softmax=False)
    fraction = torch.stack([(ids == e).sum() for e in range(EXPERTS)]).double() / (TOKENS * 2)
    want = 0.1 * EXPERTS * (fraction * probs.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    want.backward()
    torch.testing.assert_close(routing.load_balancing_loss.double(), EXPERTS * (fraction * probs.mean(0)).sum(),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(router.weight.grad.double(), weight.grad, rtol=1e-5, atol=1e-8)
    assert weight.grad.abs().sum() > 0


def test_input_jitter_is_off_by_default_and_only_applies_in_training():
    plain = _router()
    torch.manual_seed(3)
    first = plain(_tokens()).weights
    assert torch.equal(first, plain(_tokens()).weights)  # no noise drawn

    jittery = _router(moe_input_jitter_eps=0.1)
    torch.manual_seed(3)
    noisy = jittery(_tokens()).weights
    torch.manual_seed(3)
    assert torch.equal(noisy, jittery(_tokens()).weights), "same RNG state, same noise"
    assert not torch.equal(noisy, first)
    jittery.eval()
    assert torch.equal(jittery(_tokens()).weights, first)
