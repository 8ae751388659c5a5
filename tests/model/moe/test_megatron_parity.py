"""The router means what Megatron-Core's means: every routing mode, the three load-balancing
losses, the z loss and the expert-bias update against a transcription of Megatron-Core 0.16's
definitions (``tests/model/moe/megatron_reference.py``), on random logits, to fp32 rounding.
Single process: megamoe's tokens are batch-major, Megatron's sequence-major; the tests
reorder them."""

from __future__ import annotations

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.model.moe import aux_losses
from megamoe.model.moe.balancing import start_step
from megamoe.model.moe.layer import MoELayer
from megamoe.model.moe.router import RoutingRule, TopKRouter, route
from megamoe.parallel.state import single_rank_layout
from tests.model.moe import megatron_reference as mcore
from tests.harness import init_layout

HIDDEN, EXPERTS, BATCH, SEQ = 16, 8, 3, 10
FP32 = dict(rtol=1e-5, atol=1e-6)

ROUTERS = {  # the router options under which the balancing losses are computed
    "softmax": dict(moe_router_topk=2),
    "pre-softmax-groups": dict(moe_router_topk=4, moe_router_pre_softmax=True, moe_router_num_groups=4,
                               moe_router_group_topk=2),
    "sigmoid-bias-groups": dict(moe_router_topk=4, moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2),
}


def _config(**fields) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=16, num_layers=1, hidden_size=HIDDEN, num_attention_heads=2,
                                 num_experts=EXPERTS, swiglu=True, add_bias_linear=False), **fields})


def _router(seed=0, **fields) -> TopKRouter:
    router = TopKRouter(_config(**fields), EXPERTS, single_rank_layout())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=g))
        if router.expert_bias is not None:
            router.expert_bias.copy_(0.5 * torch.randn(EXPERTS, generator=g))
    return router


def _tokens(seed):
    """``[B * S, H]`` batch-major, as megamoe's layer flattens ``[b, s, h]``."""
    return torch.randn(BATCH * SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _megatron_logits(router, x_TH):
    """The router's logits in Megatron's sequence-major token order."""
    logits = x_TH @ router.weight.detach().t()
    return logits.view(BATCH, SEQ, EXPERTS).transpose(0, 1).reshape(SEQ * BATCH, EXPERTS)


MODES = {  # every routing mode: RoutingRule options, with an expert bias or not
    "softmax-after-topk": (dict(topk=2), False),
    "pre-softmax": (dict(topk=3, pre_softmax=True), False),
    "pre-softmax-top1": (dict(topk=1, pre_softmax=True), False),
    "pre-softmax-scaled": (dict(topk=3, pre_softmax=True, scaling_factor=2.5), False),
    "softmax-groups": (dict(topk=4, num_groups=4, group_topk=2), False),
    "pre-softmax-groups": (dict(topk=4, pre_softmax=True, num_groups=2, group_topk=1), False),
    "sigmoid": (dict(topk=2, score_function="sigmoid"), False),
    "sigmoid-top1": (dict(topk=1, score_function="sigmoid"), False),
    "sigmoid-scaled-groups": (dict(topk=4, score_function="sigmoid", num_groups=4, group_topk=2, scaling_factor=2.5),
                              False),
    "sigmoid-bias": (dict(topk=2, score_function="sigmoid"), True),
    "sigmoid-bias-groups": (dict(topk=4, score_function="sigmoid", num_groups=4, group_topk=2), True),
}


@pytest.mark.parametrize("options,with_bias", MODES.values(), ids=MODES.keys())
def test_every_routing_mode_gives_megatrons_choice_and_weights(options, with_bias):
    g = torch.Generator().manual_seed(7)
    logits = 2.0 * torch.randn(64, EXPERTS, generator=g)
    bias = 0.3 * torch.randn(EXPERTS, generator=g) if with_bias else None
    rule = RoutingRule(**options)
    ids, weights, _ = route(logits, rule, bias)
    want_probs, want_map = mcore.topk_routing(
        logits, rule.topk, pre_softmax=rule.pre_softmax, num_groups=rule.num_groups, group_topk=rule.group_topk,
        scaling_factor=rule.scaling_factor, score_function=rule.score_function, expert_bias=bias)
    got_map = torch.zeros_like(want_map).scatter(1, ids, True)
    assert torch.equal(got_map, want_map)
    torch.testing.assert_close(torch.zeros_like(logits).scatter(1, ids, weights), want_probs, rtol=1e-6, atol=1e-7)


def test_pre_softmax_weights_are_the_probabilities_themselves():
    """Megatron keeps the chosen softmax probabilities (they sum to less than 1)."""
    logits = torch.randn(16, EXPERTS, generator=torch.Generator().manual_seed(8))
    _, weights, probs = route(logits, RoutingRule(topk=2, pre_softmax=True))
    assert (weights.sum(-1) < 1).all()
    torch.testing.assert_close(weights, probs.topk(2, dim=-1).values)


def test_the_router_has_megatrons_learned_bias_with_linear_biases():
    """Without --disable-bias-linear Megatron-Core's router adds a learned bias [E] to its logits."""
    router = TopKRouter(_config(add_bias_linear=True), EXPERTS, single_rank_layout())
    assert _router().bias is None
    from megamoe.parallel.params import param_meta

    meta = param_meta(router.bias)
    assert router.bias.shape == (EXPERTS,) and meta.init == "zeros"
    assert not meta.weight_decay and meta.tensor_parallel_dim is None and not meta.is_expert
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=g))
        router.bias.copy_(torch.randn(EXPERTS, generator=g))
    x = _tokens(4)
    routing = router(x, num_sequences=BATCH)
    logits = x @ router.weight.detach().t() + router.bias.detach()
    want_probs, _ = mcore.topk_routing(logits, 2)
    torch.testing.assert_close(torch.zeros_like(logits).scatter(1, routing.expert_ids, routing.weights), want_probs,
                               **FP32)
    routing.load_balancing_loss.backward()
    assert router.bias.grad.abs().sum() > 0


def test_top_1_with_softmax_after_top_k_is_refused_naming_pre_softmax():
    with pytest.raises(ValueError, match="--moe-router-topk 1 .*add --moe-router-pre-softmax"):
        _config(moe_router_topk=1)
    _config(moe_router_topk=1, moe_router_pre_softmax=True)
    _config(moe_router_topk=1, moe_router_score_function="sigmoid")


@pytest.mark.parametrize("router_options", ROUTERS.values(), ids=ROUTERS.keys())
@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_balancing_loss_is_megatrons_from_a_plain_top_k_of_the_unbiased_scores(kind, router_options):
    router = _router(moe_router_load_balancing_type=kind, **router_options)
    start_step(router)
    score_function = router.rule.score_function
    global_loss = mcore.GlobalAuxLoss(EXPERTS)
    for micro_batch in range(2):  # global_aux_loss: the second one counts the running mean of both
        x = _tokens(micro_batch)
        got = router(x, num_sequences=BATCH).load_balancing_loss
        logits = _megatron_logits(router, x)
        if kind == "aux_loss":
            want = mcore.aux_loss(logits, router.rule.topk, score_function)
        elif kind == "seq_aux_loss":
            want = mcore.seq_aux_loss(logits, router.rule.topk, score_function, seq_length=SEQ, batch=BATCH)
        else:
            want = global_loss(logits, router.rule.topk, score_function)
        torch.testing.assert_close(got, want, **FP32)
    if kind == "global_aux_loss":
        start_step(router)
        fresh = mcore.GlobalAuxLoss(EXPERTS)(_megatron_logits(router, x), router.rule.topk, score_function)
        torch.testing.assert_close(router(x, num_sequences=BATCH).load_balancing_loss, fresh, **FP32)


def test_the_balancing_counts_ignore_the_expert_bias_and_the_group_limit():
    """With a bias that forces expert 0 into every choice, Megatron's loss (and megamoe's) still
    counts the unbiased top-k: the biased counts would give another value."""
    router = _router(**ROUTERS["sigmoid-bias-groups"])
    with torch.no_grad():
        router.expert_bias.zero_()[0] = 10.0
    x = _tokens(0)
    routing = router(x, num_sequences=BATCH)
    assert (routing.expert_ids == 0).any(dim=1).all()
    logits = _megatron_logits(router, x)
    torch.testing.assert_close(routing.load_balancing_loss, mcore.aux_loss(logits, 4, "sigmoid"), **FP32)
    _, scores = mcore.aux_loss_scores(logits, 4, "sigmoid")
    biased = mcore.switch_loss(scores, routing.tokens_per_expert.float(), BATCH * SEQ, 4, EXPERTS)
    assert not torch.allclose(routing.load_balancing_loss, biased, rtol=1e-3)


def test_z_loss_is_megatrons():
    router = _router(moe_router_topk=2)
    x = _tokens(3)
    torch.testing.assert_close(router(x, num_sequences=BATCH).z_loss, mcore.z_loss(_megatron_logits(router, x)),
                               **FP32)


def test_sequence_counts_are_per_sequence():
    ids = torch.tensor([[0, 1], [1, 2], [3, 3], [0, 0]])  # two sequences of two tokens
    assert aux_losses.sequence_counts(ids, 2, 4).tolist() == [[1, 2, 1, 0], [2, 0, 0, 2]]


def test_expert_bias_update_counts_the_tokens_kept_after_capacity_dropping():
    """Megatron adds the routing map after token dropping to the bias's token counts; a capacity
    factor of 0.5 drops half the slots, so the loads before dropping would move the bias otherwise."""
    config = _config(moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_expert_capacity_factor=0.5, moe_router_bias_update_rate=0.01, moe_ffn_hidden_size=8)
    torch.manual_seed(0)
    layer = MoELayer(config, 0, single_rank_layout(config.experts_by_layer()))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        layer.router.expert_bias.copy_(0.3 * torch.randn(EXPERTS))
    x = torch.randn(BATCH, SEQ, HIDDEN)
    _, aux = layer(x)
    logits = _megatron_logits(layer.router, x.view(-1, HIDDEN))
    probs, routing_map = mcore.topk_routing(logits, 2, score_function="sigmoid", expert_bias=layer.router.expert_bias)
    _, kept_map = mcore.drop_tokens(probs, routing_map, 2, 0.5)
    assert torch.equal(aux.stats.kept_tokens_per_expert, kept_map.sum(0))
    assert not torch.equal(aux.stats.kept_tokens_per_expert, routing_map.sum(0)), "the capacity must bind"
    want = mcore.updated_expert_bias(kept_map.sum(0).float(), layer.router.expert_bias.clone(), 0.01)
    layer.router.update_expert_bias(aux.stats.kept_tokens_per_expert)
    torch.testing.assert_close(layer.router.expert_bias, want, rtol=0, atol=0)


def _distributed_balancing_body(rank, world, kind):
    """TP 2 with sequence parallelism x DP 2: each TP rank routes its half of every sequence of
    its DP rank's micro-batch."""
    state = init_layout(2, sp=True)
    router = TopKRouter(_config(moe_router_topk=2, moe_router_load_balancing_type=kind), EXPERTS, state)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(0)))
    start_step(router)
    micro_batches = [[torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(10 * m + d))
                      for d in range(state.dp_size)] for m in range(2)]
    reference = mcore.GlobalAuxLoss(EXPERTS)
    half = SEQ // 2
    for per_rank in micro_batches:
        mine = per_rank[state.dp_rank]
        local = mine[:, state.tp_rank * half:(state.tp_rank + 1) * half].reshape(-1, HIDDEN)
        got = router(local, num_sequences=BATCH).load_balancing_loss
        logits = [_megatron_logits(router, x.reshape(-1, HIDDEN)) for x in per_rank]
        if kind == "seq_aux_loss":
            want = mcore.seq_aux_loss(logits[state.dp_rank], 2, "softmax", seq_length=SEQ, batch=BATCH)
        else:
            all_counts = sum(mcore.aux_loss_scores(lg, 2, "softmax")[0].sum(0).float() for lg in logits)
            # Megatron divides this rank's share by the tokens of every DP rank, which makes the
            # gradient DP times too small (NVIDIA/Megatron-LM issue 3672); megamoe's share is
            # over its own tokens, and the mean of the shares over DP is Megatron's loss.
            want = state.dp_size * reference(logits[state.dp_rank], 2, "softmax", counts_of_all_ranks=all_counts,
                                             num_ranks=state.dp_size)
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("kind", ["seq_aux_loss", "global_aux_loss"])
def test_sequence_and_global_balancing_losses_under_sequence_and_data_parallelism(kind):
    from tests.harness import run_distributed

    run_distributed(_distributed_balancing_body, 4, kind)


def test_force_load_balancing_routes_by_random_logits_and_passes_the_gradient_to_the_real_ones():
    """--moe-router-force-load-balancing (Megatron's benchmarking switch): the choice ignores the
    router, the loads come out even, and the router weight still gets the gradient."""
    router = _router(moe_router_topk=2, moe_router_force_load_balancing=True)
    with torch.no_grad():
        router.weight.zero_()[0] = 5.0  # a router that would send every token to expert 0
    x = torch.randn(4096, HIDDEN, generator=torch.Generator().manual_seed(5)).abs()
    routing = router(x, num_sequences=1)
    loads = routing.tokens_per_expert.float()
    assert loads.max() / loads.mean() < 1.1
    routing.weights.square().sum().backward()
    assert router.weight.grad.abs().sum() > 0
