"""Capacity: the per-expert budget and which token-slots an over-full expert keeps."""

from __future__ import annotations

import pytest
import torch

from megamoe.model.moe.capacity import capacity_keep_mask, expert_capacity
from tests.model.moe.reference import reference_keep


def test_capacity_is_the_ceiling_of_factor_times_the_fair_share():
    assert expert_capacity(num_tokens=16, topk=2, num_experts=4, capacity_factor=0.5) == 4
    assert expert_capacity(num_tokens=16, topk=2, num_experts=4, capacity_factor=1.3) == 11  # ceil(10.4)
    assert expert_capacity(num_tokens=3, topk=1, num_experts=8, capacity_factor=1.0) == 1


def _routing(seed, tokens=24, experts=4, topk=2, quantize=False):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=gen)
    weights, ids = torch.topk(torch.softmax(scores, -1), topk, dim=-1)
    if quantize:  # many exact ties: the earlier slot must win
        weights = (weights * 4).round() / 4
    return ids, weights


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity", [0, 3, 7, 100])
def test_keep_mask_matches_the_brute_force_rule(policy, capacity):
    for seed in range(6):
        ids, weights = _routing(seed, quantize=seed % 2 == 1)
        got = capacity_keep_mask(ids, weights, num_experts=4, capacity=capacity, policy=policy)
        want = reference_keep(ids, weights, num_experts=4, capacity=capacity, policy=policy)
        assert torch.equal(got, want), (policy, capacity, seed)
        per_expert = torch.stack([(got & (ids == e)).sum() for e in range(4)])
        routed = torch.stack([(ids == e).sum() for e in range(4)])
        assert torch.equal(per_expert, routed.clamp(max=capacity))


def test_the_two_policies_keep_different_slots():
    ids, weights = _routing(0, tokens=64)
    by_probs = capacity_keep_mask(ids, weights, num_experts=4, capacity=8, policy="probs")
    by_position = capacity_keep_mask(ids, weights, num_experts=4, capacity=8, policy="position")
    assert not torch.equal(by_probs, by_position)
    assert weights[by_probs].sum() > weights[by_position].sum()


def test_unknown_policy_names_the_flag():
    ids, weights = _routing(0)
    with pytest.raises(ValueError, match="--moe-token-drop-policy"):
        capacity_keep_mask(ids, weights, num_experts=4, capacity=2, policy="random")
