"""A GPT model with MoE layers gives the same parameters, loss, auxiliary loss and gradients at
any (TP, EP) layout as a TP=1 reference model whose MoE blocks are the plain-torch
``ReferenceMoEBlock`` (no dispatcher, no all-to-all, no grouped GEMM), run over every
data-parallel rank's micro-batch and averaged.

The reference is built first in the same processes at TP=1, EP=1; then the groups are rebuilt
for the layout under test.  Gradients go through the reduction rule of the gradient-math note
(dense: sum over DP / DP, experts: sum over EDP / DP) before the comparison.
"""

from __future__ import annotations

import torch

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.state import single_rank_layout
from megamoe.parallel.gather import gather_full_state
from tests.harness import init_layout, run_distributed
from tests.model.moe.helpers import assert_matches, reduced_full_grads
from tests.tiny_moe import tiny_config
from tests.model.moe.layer_case import Case, check_layer_case
from tests.model.moe.reference import ReferenceMoEBlock

SEED = 4321
VOCAB, BATCH, SEQ = 64, 2, 8


def _config(num_experts, **overrides) -> ModelConfig:
    return tiny_config(vocab_size=VOCAB, moe_ffn_hidden_size=16, num_experts=num_experts, moe_aux_loss_coeff=0.1,
                       moe_z_loss_coeff=0.01, **overrides)


def _micro_batch(d: int):
    gen = torch.Generator().manual_seed(500 + d)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _reference(num_experts, overrides, dp):
    """TP=1, EP=1 model with reference MoE blocks, over the ``dp`` micro-batches."""
    cfg = _config(num_experts, **overrides)
    model = GPTModel(cfg, single_rank_layout(cfg.experts_by_layer())).initialize(SEED)
    for i in cfg.moe_layers:
        model.layers[i].mlp = ReferenceMoEBlock(model.layers[i].mlp, cfg)
    outputs = [model(*_micro_batch(d)) for d in range(dp)]
    (sum(o.loss for o in outputs) / dp).backward()
    return {
        "loss": [o.loss.detach() for o in outputs],
        "aux": [o.aux_loss.detach() for o in outputs],
        "params": gather_full_state(model, model.layout),  # drops the vocabulary padding, as for the tested layouts
        "grads": gather_full_state(model, model.layout, grads=True),
    }


def _gpt_body(rank, world, tp, cases):
    """``cases``: (num_experts, ep sizes, config overrides); all at tensor-parallel size ``tp``."""
    dp = world // tp
    references = [_reference(num_experts, overrides, dp) for num_experts, _, overrides in cases]

    for (num_experts, eps, overrides), ref in zip(cases, references):
        label = f"tp={tp} experts={num_experts} ep={eps} {overrides}"
        config = _config(num_experts, **overrides)
        state = init_layout(tp, eps if isinstance(eps, tuple) else (eps,), experts_by_layer=config.experts_by_layer())
        model = GPTModel(config, state).initialize(SEED)
        params = gather_full_state(model, model.layout)
        assert params.keys() == ref["params"].keys(), label
        for name, full in params.items():
            assert torch.equal(full, ref["params"][name]), f"{name} differs from the EP=1 initialisation ({label})"
        out = model(*_micro_batch(state.dp_rank))
        out.loss.backward()
        assert_matches(out.loss, ref["loss"][state.dp_rank], f"loss {label}")
        assert_matches(out.aux_loss, ref["aux"][state.dp_rank], f"aux loss {label}")
        assert len(out.moe_stats) == len(model.config.moe_layers)
        grads = reduced_full_grads(model)
        for name, want in ref["grads"].items():
            assert want.abs().sum() > 0, f"{name} got no gradient in the reference"
            assert_matches(grads[name], want, f"grad {name} {label}")


SHARED = dict(moe_shared_expert_intermediate_size=16)


def test_gpt_with_moe_matches_reference_for_any_expert_parallel_size():
    """DP=4, TP=1: EP 1, 2, 4 for both MoE layers, then a pyramid model whose two MoE layers
    use different expert counts and EP sizes (4 experts at EP=4, 8 experts at EP=2)."""
    cases = [(4, 1, SHARED), (4, 2, SHARED), (4, 4, SHARED), ((4, 8), (4, 2), {})]
    run_distributed(_gpt_body, 4, 1, cases)


def test_gpt_with_moe_matches_reference_with_tensor_parallel_experts():
    """TP=2, DP=2: EP 1 and 2 (with biases on every linear layer), and two EP sizes in one model."""
    cases = [(4, 1, SHARED), (4, 2, dict(SHARED, add_bias_linear=True)), ((4, 8), (2, 1), {})]
    run_distributed(_gpt_body, 4, 2, cases)


def _world8_body(rank, world):
    _gpt_body(rank, world, 2, [(4, 4, SHARED)])
    check_layer_case(Case(ep=4, overrides=SHARED))
    check_layer_case(Case(ep=4, overrides=dict(moe_router_topk=1, moe_router_pre_softmax=True), uneven=True))


def test_tensor_parallel_2_with_expert_parallel_4_on_8_ranks():
    """TP=2, DP=4, EP=4: the model and the layer (dropless and uneven) match their references."""
    run_distributed(_world8_body, 8)
