"""AdamW decays exactly the parameters the weight-decay rule names (``tests/tiny_moe.py::decays``, written from
the parameter names, not from the tags the optimizer reads): matrices, embeddings, the output
layer, the router, the experts and the shared expert; never biases or norm weights.  Checked on
the optimizer's own param groups, with TP-sharded, TP-replicated, expert and ZeRO-1 pieces."""

import torch

from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from tests.harness import init_layout, run_distributed
from tests.tiny_moe import HYPER, decays, model_config

LAYOUTS = [(2, (1, 1), True), (1, (2, 2), False)]  # (TP, EP per MoE layer, ZeRO-1)
RICH = dict(normalization="LayerNorm", untie_embeddings_and_output_weights=True)


def _body(rank, world):
    out = []
    for tp, eps, zero in LAYOUTS:
        config = model_config(**RICH)
        layout = init_layout(tp, eps, experts_by_layer=config.experts_by_layer())
        model = GPTModel(config, layout)
        opt = MixedPrecisionOptimizer(model, OptimizerConfig(**{**HYPER, "use_distributed_optimizer": zero}), layout)
        params = dict(model.named_parameters())
        decay_of = {id(t): group["weight_decay"] for group in opt.optimizer.param_groups for t in group["params"]}
        seen = {}
        for piece in opt.pieces:
            want = HYPER["weight_decay"] if decays(piece.name, params[piece.name]) else 0.0
            assert decay_of[id(piece.master)] == want, f"TP={tp} EP={eps} ZeRO={zero} {piece.name}: weight decay {decay_of[id(piece.master)]}, want {want}"
            seen[piece.name] = want > 0
        out.append((sorted(params), seen))
    return out


def test_weight_decay_on_matrices_embeddings_router_and_experts_never_on_biases_or_norms():
    results = run_distributed(_body, 2)
    for index, layout in enumerate(LAYOUTS):
        names = results[0][index][0]
        seen = {name: decayed for rank in range(2) for name, decayed in results[rank][index][1].items()}
        assert sorted(seen) == names, f"{layout}: some parameter is in no rank's optimizer"
        kinds = {"bias", "norm", "word_embeddings", "output_layer", "router", "experts.fc1", "shared_expert", "qkv"}
        for kind in kinds:
            assert any(kind in name for name in names), f"the test model has no {kind}"
        assert not any(seen[n] for n in names if "norm" in n or n.endswith("bias")), layout
        assert all(seen[n] for n in names if any(k in n for k in ("embeddings", "output_layer", "router.weight")))


def test_the_rule_itself():
    matrix, vector = torch.empty(4, 4), torch.empty(4)
    assert decays("layers.0.mlp.experts.fc1", torch.empty(2, 4, 4)) and decays("word_embeddings.weight", matrix)
    assert not decays("layers.0.mlp.experts.fc2_bias", matrix) and not decays("layers.0.attention.qkv.bias", matrix)
    assert not decays("final_norm.weight", vector) and not decays("layers.1.input_norm.bias", vector)
