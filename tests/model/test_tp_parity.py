"""A model built at TP=2 or TP=4 computes the same logits, loss and gradients as at TP=1."""

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout_rules import validate_parallel_layout
from megamoe.parallel.gather import gather_full, gather_full_state
from megamoe.parallel.mappings import gather_from_tp_region
from tests.harness import init_layout, run_distributed
from tests.tiny_moe import tiny_config

VARIANTS = {
    "rms-rope-swiglu-tied": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                                 add_bias_linear=False),
    "ln-learned-gelu-bias-untied": dict(
        normalization="LayerNorm",
        position_embedding_type="learned_absolute",
        swiglu=False,
        add_bias_linear=True,
        untie_embeddings_and_output_weights=True,
    ),
    # 8 query heads in 4 groups (2 per TP rank at TP 2, 1 at TP 4), head dim 6 (8 x 6 != hidden 32)
    "gqa-qk-layernorm-kv-channels": dict(
        normalization="LayerNorm", num_attention_heads=8, kv_channels=6, group_query_attention=True,
        num_query_groups=4, qk_layernorm=True, swiglu=True, add_bias_linear=False,
    ),
}


def _config(variant):
    # vocab 300 pads to 384 at TP=1 and 512 at TP=2/4: the padding must not change the loss.
    return tiny_config(vocab_size=300, num_experts=None, **VARIANTS[variant])


def _run_layout(tp, variant, tokens, labels):
    layout = init_layout(tp)
    model = GPTModel(_config(variant), layout).initialize(seed=1234)
    out = model(tokens, labels)
    out.loss.backward()
    logits = gather_from_tp_region(model(tokens).logits, layout)[..., : model.config.vocab_size]
    result = {
        "loss": out.loss.detach(),
        "logits": logits.detach(),
        "params": gather_full_state(model, model.layout),
        "grads": gather_full_state(model, model.layout, grads=True),
    }
    return result


def _parity_body(rank, world, variant):
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 16))
    labels = torch.randint(0, 300, (2, 16))
    reference = _run_layout(1, variant, tokens, labels)
    for tp in (2, 4):
        got = _run_layout(tp, variant, tokens, labels)
        torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["logits"], reference["logits"], rtol=1e-5, atol=1e-6)
        assert got["params"].keys() == reference["params"].keys()
        for name in reference["params"]:
            torch.testing.assert_close(got["params"][name], reference["params"][name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(got["grads"][name], reference["grads"][name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name} tp={tp}: {m}")
            assert reference["grads"][name].abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tensor_parallel_matches_single_rank(variant):
    run_distributed(_parity_body, 4, variant)


def _init_body(rank, world):
    """Replicated params agree over TP; sharded ones are the TP=1 tensor's slices."""
    layout = init_layout(2)
    model = GPTModel(_config("rms-rope-swiglu-tied"), layout).initialize(seed=7)
    for name, p in model.named_parameters():
        full = gather_full(p, p, model.layout)
        assert torch.isfinite(full).all()
    emb = model.word_embeddings.weight
    if layout.tp_rank == 1:
        # rows 256..511 of the padded vocabulary: ids 256..299 real, the rest zero padding
        assert emb[44:].abs().sum() == 0 and emb[:44].abs().sum() > 0


def test_vocab_padding_rows_are_zero():
    run_distributed(_init_body, 2)


def test_invalid_model_layouts_name_the_flags():
    cfg = _config("rms-rope-swiglu-tied")
    with pytest.raises(ValueError, match=r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"):
        cfg.check_tensor_parallel(tensor_model_parallel_size=8, expert_tensor_parallel_size=8)
    with pytest.raises(ValueError, match=r"--ffn-hidden-size 48 is not divisible by --tensor-model-parallel-size 32"):
        ModelConfig(vocab_size=10, hidden_size=64, num_attention_heads=32, ffn_hidden_size=48).check_tensor_parallel(
            tensor_model_parallel_size=32, expert_tensor_parallel_size=32)
    gqa = ModelConfig(vocab_size=10, num_attention_heads=4, group_query_attention=True, num_query_groups=2)
    with pytest.raises(ValueError, match=r"--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        gqa.check_tensor_parallel(tensor_model_parallel_size=4, expert_tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"--num-query-groups 3 must divide --num-attention-heads 4"):
        ModelConfig(vocab_size=10, num_attention_heads=4, group_query_attention=True, num_query_groups=3)
    with pytest.raises(ValueError, match=r"--num-query-groups needs --group-query-attention"):
        ModelConfig(vocab_size=10, num_attention_heads=4, num_query_groups=2)
    with pytest.raises(ValueError, match=r"--hidden-size 30 is not divisible by --num-attention-heads 4"):
        ModelConfig(vocab_size=10, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"--num-experts 6 \(layer 0\) is not divisible by --expert-model-parallel-size 4"):
        validate_parallel_layout(ParallelConfig(world_size=4, expert_model_parallel_size=(4,)),
                                 ModelConfig(vocab_size=10, num_experts=6).experts_by_layer())
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 4 does not divide the data-parallel size 2"):
        validate_parallel_layout(ParallelConfig(world_size=2, expert_model_parallel_size=(4,)),
                                 ModelConfig(vocab_size=10, num_experts=4).experts_by_layer())
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size got 3 values"):
        validate_parallel_layout(ParallelConfig(world_size=4, expert_model_parallel_size=(1, 2, 4)),
                                 ModelConfig(vocab_size=10, num_layers=2, num_experts=4).experts_by_layer())
