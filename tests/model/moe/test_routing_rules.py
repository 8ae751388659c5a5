"""The routing rules (score function, group limit, expert bias, scaling factor) against a plain
fp64 reference written from their definitions, one token at a time; the expert-bias update and
its place in the model state.  Single process: routing communicates nothing."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.model.moe.balancing import update_expert_biases
from megamoe.model.moe.layer import MoEStats
from megamoe.model.moe.router import RoutingRule, TopKRouter, bias_step, route
from megamoe.parallel.state import single_rank_layout

TOKENS, EXPERTS = 24, 8


def reference_token(logits, *, rule: RoutingRule, bias=None) -> dict[int, float]:
    """{expert: weight} for one token's logits (a list of floats), by the definitions."""
    n = len(logits)
    if rule.score_function == "sigmoid":
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
        choice = [s + (0.0 if bias is None else b) for s, b in zip(scores, bias or [0.0] * n)]
    elif rule.pre_softmax:
        total = sum(math.exp(v) for v in logits)
        scores = choice = [math.exp(v) / total for v in logits]
    else:
        scores = choice = list(logits)
    allowed = list(range(n))
    if rule.num_groups is not None:
        size = n // rule.num_groups
        members = [list(range(g * size, (g + 1) * size)) for g in range(rule.num_groups)]
        group_score = [sum(sorted((choice[e] for e in m), reverse=True)[: rule.topk // rule.group_topk])
                       for m in members]
        best = sorted(range(rule.num_groups), key=lambda g: -group_score[g])[: rule.group_topk]
        allowed = [e for g in best for e in members[g]]
    chosen = sorted(allowed, key=lambda e: -choice[e])[: rule.topk]
    if rule.score_function == "softmax" and not rule.pre_softmax:
        total = sum(math.exp(logits[e]) for e in chosen)
        weights = [math.exp(logits[e]) / total for e in chosen]
    else:
        weights = [scores[e] for e in chosen]
        if rule.score_function == "sigmoid" and rule.renormalize and rule.topk > 1:
            weights = [w / sum(weights) for w in weights]
    factor = rule.scaling_factor or 1.0
    return {e: w * factor for e, w in zip(chosen, weights)}


def _dense(ids, weights) -> torch.Tensor:
    return torch.zeros(ids.shape[0], EXPERTS, dtype=torch.float64).scatter_(1, ids, weights.double())


def _reference_dense(logits, rule, bias=None) -> torch.Tensor:
    out = torch.zeros(logits.shape[0], EXPERTS, dtype=torch.float64)
    for t, row in enumerate(logits.tolist()):
        for e, w in reference_token(row, rule=rule, bias=None if bias is None else bias.tolist()).items():
            out[t, e] = w
    return out


RULES = [
    RoutingRule(topk=2),
    RoutingRule(topk=3, pre_softmax=True),
    RoutingRule(topk=3, pre_softmax=True, scaling_factor=2.5),
    RoutingRule(topk=2, score_function="sigmoid"),
    RoutingRule(topk=1, score_function="sigmoid"),
    RoutingRule(topk=3, score_function="sigmoid", renormalize=False),
    RoutingRule(topk=4, score_function="sigmoid", num_groups=4, group_topk=2, scaling_factor=2.5),
    RoutingRule(topk=4, num_groups=4, group_topk=2),
    RoutingRule(topk=3, pre_softmax=True, num_groups=2, group_topk=1),
]


CASES = [(rule, False) for rule in RULES] + [(rule, True) for rule in RULES if rule.score_function == "sigmoid"]


@pytest.mark.parametrize("rule,with_bias", CASES, ids=lambda c: str(c) if isinstance(c, bool) else
                         f"{c.score_function}-pre{int(c.pre_softmax)}-k{c.topk}-g{c.num_groups}")
def test_routing_rule_matches_its_definition_in_fp64(rule, with_bias):
    g = torch.Generator().manual_seed(5)
    logits = 2.0 * torch.randn(TOKENS, EXPERTS, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(EXPERTS, generator=g, dtype=torch.float64) if with_bias else None
    ids, weights, probs = route(logits, rule, bias)
    torch.testing.assert_close(_dense(ids, weights), _reference_dense(logits, rule, bias), rtol=1e-12, atol=1e-14)
    want_probs = torch.sigmoid(logits) if rule.score_function == "sigmoid" else torch.softmax(logits, -1)
    torch.testing.assert_close(probs, want_probs / want_probs.sum(-1, keepdim=True), rtol=1e-12, atol=0)


def test_group_limit_keeps_every_token_inside_its_chosen_groups():
    rule = RoutingRule(topk=4, score_function="sigmoid", num_groups=4, group_topk=2)
    logits = torch.randn(256, EXPERTS, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ids, _, _ = route(logits, rule)
    assert all(len(set((row // 2).tolist())) <= 2 for row in ids)
    free_ids, _, _ = route(logits, RoutingRule(topk=4, score_function="sigmoid"))
    assert max(len(set((row // 2).tolist())) for row in free_ids) > 2, "the limit must bind for this test"


def test_expert_bias_changes_the_choice_but_not_the_weights():
    """A large bias forces expert 5 into every token's top-k; its weight is still its plain sigmoid share."""
    rule = RoutingRule(topk=2, score_function="sigmoid")
    logits = torch.randn(TOKENS, EXPERTS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bias = torch.zeros(EXPERTS, dtype=torch.float64)
    bias[5] = 10.0
    ids, weights, _ = route(logits, rule, bias)
    assert (ids == 5).any(dim=1).all()
    scores = torch.sigmoid(logits).gather(1, ids)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


def _router(**overrides) -> TopKRouter:
    fields = dict(vocab_size=16, hidden_size=16, num_attention_heads=2, num_experts=EXPERTS, moe_router_topk=2,
                  moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, add_bias_linear=False)
    fields.update(overrides)
    return TopKRouter(ModelConfig(**fields), EXPERTS, single_rank_layout())


def test_router_in_fp32_follows_the_fp64_definition_and_the_bias_gets_no_gradient():
    router = _router(moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, 16, generator=g))
        router.expert_bias.copy_(0.2 * torch.randn(EXPERTS, generator=g))
    x = torch.randn(TOKENS, 16, generator=g)
    routing = router(x)
    logits = x.double() @ router.weight.detach().double().t()
    want = _reference_dense(logits, router.rule, router.expert_bias.double())
    torch.testing.assert_close(_dense(routing.expert_ids, routing.weights), want, rtol=1e-6, atol=1e-7)
    routing.weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0 and not router.expert_bias.requires_grad


def test_bias_moves_by_the_rate_towards_balance():
    loads = torch.tensor([10, 0, 5, 5, 7, 3, 5, 5])  # mean 5
    torch.testing.assert_close(bias_step(loads, 0.01), torch.tensor([-0.01, 0.01, 0, 0, -0.01, 0.01, 0, 0]))
    router = _router(moe_router_bias_update_rate=0.01)
    stats = [MoEStats(tokens_per_expert=half, kept_tokens_per_expert=half, dropped_fraction=torch.zeros(()), aux_loss=torch.zeros(()),
                      z_loss=torch.zeros(())) for half in (loads // 2, loads - loads // 2)]
    model = torch.nn.ModuleDict({"router": router})
    update_expert_biases(model, [[stats[0]], [stats[1]]])  # two micro-batches of one MoE layer
    update_expert_biases(model, [[stats[0]], [stats[1]]])
    torch.testing.assert_close(router.expert_bias, 2 * bias_step(loads, 0.01))


def test_expert_bias_is_saved_and_restored_with_the_model_state():
    router = _router()
    with torch.no_grad():
        router.expert_bias.fill_(0.25)
    state = router.state_dict()
    assert "expert_bias" in state
    fresh = _router()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.expert_bias, router.expert_bias)
    assert "expert_bias" not in _router(moe_router_enable_expert_bias=False).state_dict()
