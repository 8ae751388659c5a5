"""The FLOPs formula reproduces the peer benchmark's numbers for moe-1b-4e."""

from megamoe.model.config import ModelConfig
from megamoe.training.flops import active_parameters, flops_per_token


def test_moe_1b_4e_matches_peer_convention():
    cfg = ModelConfig(vocab_size=32000, num_layers=16, hidden_size=2048, num_attention_heads=16,
                      ffn_hidden_size=5632, max_position_embeddings=2048, swiglu=True, num_experts=4,
                      moe_router_topk=2, untie_embeddings_and_output_weights=True)
    assert active_parameters(cfg) == 1_441_398_784  # the peer benchmarks' count for this shape
    assert abs(flops_per_token(cfg, 2048) - 9.4537e9) / 9.4537e9 < 1e-4
