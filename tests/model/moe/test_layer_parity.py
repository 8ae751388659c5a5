"""The MoE layer computes the same output, statistics, auxiliary losses and gradients whatever
the expert-parallel and tensor-parallel sizes, and those match a plain-torch fp64 MoE
(``reference.py``) run on every data-parallel rank's micro-batch.

Each rank feeds its own micro-batch ``x_d`` and back-propagates ``<out, g_d> + aux.loss``;
the reference back-propagates the mean over the DP ranks of the same per-rank losses.  After the
reduction rule (dense: sum over DP / DP, experts: sum over EDP / DP) and gathering the experts
back to global order, every gradient must agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import initialize_module_
from megamoe.parallel.random import model_parallel_seed
from tests.harness import current_layout, init_layout, run_distributed
from tests.model.moe.helpers import assert_matches
from tests.model.moe.layer_case import EXPERTS, HIDDEN, SEED, Case, check_layer_case, layer_config, layer_of, micro_batch
from tests.model.moe.reference import reference_moe

DROPLESS = [
    Case(ep=1, overrides=dict(moe_shared_expert_intermediate_size=16)),
    Case(ep=2, overrides=dict(moe_shared_expert_intermediate_size=16)),
    Case(ep=4, overrides=dict(moe_shared_expert_intermediate_size=16)),
    # softmax before top-k (no renormalisation), GeLU experts, the per-expert fallback GEMM
    Case(ep=2, overrides=dict(moe_router_pre_softmax=True, swiglu=False, moe_grouped_gemm=False)),
    # biases (Megatron's default without --disable-bias-linear) on the router, the experts and the shared expert
    Case(ep=2, overrides=dict(add_bias_linear=True, moe_shared_expert_intermediate_size=16)),
    Case(ep=4, overrides=dict(add_bias_linear=True, swiglu=False)),
    # the top-k weights scaled (once: the router applies it, the layer must not again)
    Case(ep=2, overrides=dict(moe_router_topk_scaling_factor=2.5)),
]
CAPACITY = [
    Case(ep=2, overrides=dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs"), expect_drops=True),
    Case(ep=4, overrides=dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"), expect_drops=True),
    # eval uses --moe-eval-capacity-factor (2.0: room for every slot) instead of the training 0.5
    Case(ep=2, overrides=dict(moe_expert_capacity_factor=0.5, moe_eval_capacity_factor=2.0), train=False),
]
UNEVEN = [
    Case(ep=4, overrides=dict(moe_router_topk=1, moe_router_pre_softmax=True), uneven=True),  # one expert takes every token
    Case(ep=2, uneven=True),  # experts 0 and 1 (EP rank 0) take everything, EP rank 1 gets nothing
    Case(ep=4, overrides=dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_grouped_gemm=False), uneven=True),
    Case(ep=4, overrides=dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
                              moe_token_drop_policy="position"), uneven=True, expect_drops=True),
]


def _layer_body(rank, world, cases):
    for case in cases:
        check_layer_case(case)


def test_moe_layer_matches_reference_for_any_expert_parallel_size():
    """DP=4, TP=1, EP in {1, 2, 4}: dropless, capacity with both drop policies, uneven routing."""
    run_distributed(_layer_body, 4, DROPLESS + CAPACITY + UNEVEN, tensor_model_parallel_size=1,
                    expert_model_parallel_sizes=(1, 2, 4))


def _tp_body(rank, world, cases):
    for case in cases:
        check_layer_case(case)
    _check_jitter_routes_alike_on_tp_ranks()


def _check_jitter_routes_alike_on_tp_ranks() -> None:
    """With input jitter on, both TP ranks of a group must still pick the same experts."""
    state = current_layout()
    model_parallel_seed(7, state)
    layer = layer_of(Case(ep=1, overrides=dict(moe_input_jitter_eps=0.5)), state)
    initialize_module_(layer, SEED, state)
    x, _ = micro_batch(state.dp_rank, uneven=False)
    ids = layer.router(x.view(-1, HIDDEN)).expert_ids
    layer.eval()
    plain = layer.router(x.view(-1, HIDDEN)).expert_ids
    gathered = [torch.empty_like(ids) for _ in range(state.tp_size)]
    dist.all_gather(gathered, ids, group=state.tp_group)
    assert all(torch.equal(g, ids) for g in gathered), "jitter routed the TP ranks differently"
    assert not torch.equal(ids, plain), "jitter 0.5 changed no routing decision: it is not applied"


def _sequence_parallel_capacity_body(rank, world):
    """TP 2 with sequence parallelism: each TP rank routes its own half of the sequence, and its
    capacity comes from those T / TP tokens, not the whole micro-batch's T."""
    case = Case(ep=1, overrides=dict(moe_expert_capacity_factor=0.5))
    cfg = layer_config(case)
    state = init_layout(2, sp=True, experts_by_layer=cfg.experts_by_layer())
    layer = layer_of(case, state)
    initialize_module_(layer, SEED, state)
    x_full, _ = micro_batch(state.dp_rank, uneven=False)
    x = x_full.chunk(state.tp_size, dim=1)[state.tp_rank]  # this rank's positions [b, s / TP, h]
    out, aux = layer(x)
    weights = {name: full.double() for name, full in gather_full_state(layer, layer.layout).items()}
    tokens = x.shape[0] * x.shape[1]
    ref = reference_moe(x.double().reshape(tokens, HIDDEN), weights, cfg=cfg, num_experts=EXPERTS,
                        capacity_factor=0.5)
    assert ref.dropped > 0, "the capacity must bind to test anything"
    assert_matches(out.reshape(tokens, HIDDEN), ref.out, f"output of TP rank {state.tp_rank}")
    assert round(aux.stats.dropped_fraction.item() * tokens * cfg.moe_router_topk) == ref.dropped


def test_sequence_parallel_capacity_is_sized_from_each_ranks_tokens():
    run_distributed(_sequence_parallel_capacity_body, 2)


def test_moe_layer_with_tensor_parallel_experts_matches_reference():
    """TP=2 (each expert split over the TP group), DP=2, EP in {1, 2}."""
    cases = [c for c in DROPLESS + CAPACITY + UNEVEN if c.ep <= 2]
    run_distributed(_tp_body, 4, cases, tensor_model_parallel_size=2, expert_model_parallel_sizes=(1, 2))
