"""The FLOPs formula reproduces the peer benchmark's numbers for moe-1b-4e."""

from megamoe.model.config import ModelConfig
from megamoe.training.flops import active_parameters, flops_per_token, mfu, peak_tflops_of


def test_moe_1b_4e_matches_peer_convention():
    cfg = ModelConfig(vocab_size=32000, num_layers=16, hidden_size=2048, num_attention_heads=16,
                      ffn_hidden_size=5632, max_position_embeddings=2048, swiglu=True, num_experts=4,
                      moe_router_topk=2, untie_embeddings_and_output_weights=True)
    assert active_parameters(cfg) == 1_441_398_784  # the peer benchmarks' count for this shape
    assert abs(flops_per_token(cfg, 2048) - 9.4537e9) / 9.4537e9 < 1e-4


def _deepseek_v3(**fields) -> ModelConfig:
    return ModelConfig(**{**dict(
        vocab_size=129280, num_layers=61, hidden_size=7168, num_attention_heads=128, ffn_hidden_size=18432,
        moe_ffn_hidden_size=2048, num_experts=256, moe_layer_freq=tuple([0] * 3 + [1] * 58), moe_router_topk=8,
        moe_shared_expert_intermediate_size=2048, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True, max_position_embeddings=163840, multi_latent_attention=True,
        q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, qk_layernorm=True,
        moe_router_score_function="sigmoid"), **fields})


def test_deepseek_v3_counts_its_published_37b_active_parameters():
    # DeepSeek-V3's report: 37B activated parameters per token (with the 0.93B input embedding).
    cfg = _deepseek_v3()
    assert abs(active_parameters(cfg) + 129280 * 7168 - 37.55e9) / 37.55e9 < 1e-3
    # MLA per layer, by hand: queries (q-lora down and up, or one projection), the kv latent with
    # the shared RoPE key, kv up, output.
    rest = 7168 * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * 7168
    dense = active_parameters(_deepseek_v3(multi_latent_attention=False, q_lora_rank=None, kv_lora_rank=None,
                                           qk_head_dim=None, qk_pos_emb_head_dim=None, v_head_dim=None,
                                           qk_layernorm=False, kv_channels=128))
    mha = 4 * 7168 * 128 * 128
    assert active_parameters(cfg) - dense == 61 * (7168 * 1536 + 1536 * 128 * 192 + rest - mha)
    assert active_parameters(_deepseek_v3(q_lora_rank=None)) - dense == 61 * (7168 * 128 * 192 + rest - mha)
    # scores and attention x V: 128 heads x (192 + 128) per position
    scores = 6.0 * 61 * 128 * (192 + 128) * 4096
    assert flops_per_token(cfg, 4096) == 6.0 * active_parameters(cfg) + scores


def test_mtp_depth_adds_a_block_its_projection_and_the_shared_head():
    cfg, mtp = _deepseek_v3(), _deepseek_v3(mtp_num_layers=2)
    moe_layer = active_parameters(_deepseek_v3(num_layers=62, moe_layer_freq=tuple([0] * 3 + [1] * 59))) - \
        active_parameters(cfg)
    per_depth = moe_layer + 2 * 7168 * 7168 + 7168 * 129280
    assert active_parameters(mtp) - active_parameters(cfg) == 2 * per_depth
    scores_per_layer = 6.0 * 128 * (192 + 128) * 4096
    assert flops_per_token(mtp, 4096) - flops_per_token(cfg, 4096) == 6.0 * 2 * per_depth + 2 * scores_per_layer


def test_peak_flops_come_from_the_device_name_and_unknown_devices_get_no_mfu():
    assert peak_tflops_of("NVIDIA H200") == 989.0 and peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops_of("NVIDIA B200") == 2250.0
    assert peak_tflops_of("NVIDIA GeForce RTX 4090") is None
    assert mfu(400.0, None) is None and mfu(494.5, 989.0) == 0.5


def test_peak_flag_overrides_the_table():
    from megamoe.training.arguments import parse_config

    argv = ["--device", "cpu", "--mock-data", "--peak-tflops-per-device", "100"]
    assert parse_config(argv, world_size=1).logging.peak_tflops == 100.0
    assert parse_config(argv[:3], world_size=1).logging.peak_tflops is None  # CPU: no MFU
