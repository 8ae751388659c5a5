"""--recompute-granularity full: the same loss and gradients, dropout and all-to-all included,
with far fewer activations kept for backward."""

import dataclasses

import torch

from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import single_rank_layout
from tests.harness import init_layout, run_distributed
from tests.tiny_moe import tiny_config

BASE = tiny_config(num_layers=3, moe_layer_freq=(1, 0, 1), hidden_dropout=0.1, attention_dropout=0.1)


def _run(execution, layout, tokens, labels):
    model = GPTModel(BASE, layout, execution).initialize(seed=5)
    model.train()
    model_parallel_seed(11, layout)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, labels)
    out.loss.backward()
    return out.loss.detach(), gather_full_state(model, model.layout, grads=True), sum(saved.values())


def _body(rank, world, layouts):
    g = torch.Generator().manual_seed(rank)  # each DP rank its own tokens: the all-to-all moves real data
    tokens, labels = torch.randint(0, 200, (2, 16), generator=g), torch.randint(0, 200, (2, 16), generator=g)
    for tp, ep in layouts:
        layout = init_layout(tp, (ep,), experts_by_layer=BASE.experts_by_layer())
        stored = _run(ExecutionConfig(), layout, tokens, labels)
        again = _run(ExecutionConfig(recompute_granularity="full"), layout, tokens, labels)
        first_only = _run(ExecutionConfig(recompute_granularity="full", recompute_num_layers=1), layout, tokens, labels)
        chunks_of_2 = _run(ExecutionConfig(recompute_granularity="full", recompute_method="uniform",
                                           recompute_num_layers=2), layout, tokens, labels)
        selective = _run(ExecutionConfig(recompute_granularity="selective"), layout, tokens, labels)
        for got in (again, first_only, chunks_of_2, selective):
            assert torch.equal(got[0], stored[0]), (tp, ep, got[0], stored[0])
            for name, grad in stored[1].items():
                assert torch.equal(got[1][name], grad), (tp, ep, name)
        assert 4 * again[2] < stored[2] and again[2] < first_only[2] < stored[2], (again[2], first_only[2], stored[2])
        assert chunks_of_2[2] < again[2], (chunks_of_2[2], again[2])  # 2 chunk inputs kept instead of 3 layer inputs
        assert selective[2] == stored[2]


def test_recomputation_gives_the_same_gradients_with_fewer_saved_activations():
    run_distributed(_body, 4, [(1, 2), (2, 2)])


def test_recompute_flags_are_validated():
    import pytest

    with pytest.raises(ValueError, match=r"--recompute-granularity 'partial': valid values are \['full', 'selective'\]"):
        ExecutionConfig(recompute_granularity="partial")
    with pytest.raises(ValueError, match="--recompute-method and --recompute-num-layers need --recompute-granularity full"):
        ExecutionConfig(recompute_granularity="selective", recompute_method="uniform")
    assert ExecutionConfig(recompute_granularity="full").layer_chunks(5) == [(i, i + 1, True) for i in range(5)]
    assert ExecutionConfig(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=2).layer_chunks(5) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert ExecutionConfig(recompute_granularity="full", recompute_num_layers=2).layer_chunks(5) == [
        (0, 1, True), (1, 2, True), (2, 3, False), (3, 4, False), (4, 5, False)]
    with pytest.raises(ValueError, match=r"--recompute-num-layers 4 must be in \[1, --num-layers 3\]"):
        ExecutionConfig(recompute_granularity="full", recompute_num_layers=4).layer_chunks(BASE.num_layers)


def _global_aux_grads(execution):
    from megamoe.model.moe.balancing import start_step
    from megamoe.model.moe.router import TopKRouter

    config = dataclasses.replace(BASE, hidden_dropout=0.0, attention_dropout=0.0, moe_aux_loss_coeff=1.0,
                                 moe_router_load_balancing_type="global_aux_loss")
    model = GPTModel(config, single_rank_layout(config.experts_by_layer()), execution).initialize(seed=5)
    model.train()
    start_step(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        tokens, labels = torch.randint(0, 200, (2, 16), generator=g), torch.randint(0, 200, (2, 16), generator=g)
        model(tokens, labels).loss.backward()
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    return {n: p.grad.clone() for n, p in model.named_parameters()}, [r.step_micro_batches for r in routers]


def test_recomputation_counts_each_micro_batch_once_for_the_global_aux_loss():
    """The recomputed forward reads the step's running counts instead of adding to them again."""
    stored, counted = _global_aux_grads(ExecutionConfig())
    again, counted_again = _global_aux_grads(ExecutionConfig(recompute_granularity="full"))
    assert counted == counted_again == [2, 2]
    for name, grad in stored.items():
        torch.testing.assert_close(again[name], grad, rtol=0, atol=0, msg=name)
