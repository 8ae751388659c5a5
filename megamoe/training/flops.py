"""Model FLOPs per token and MFU, in the convention the peer frameworks' benchmarks use, so
that MFU compares across frameworks:

    N_active = sum over layers of
                 2 h n d + 2 h G d                (q and output, k and v projections: n query heads,
                                                   G key/value heads of dim d; 4 h^2 for plain MHA)
               + dense layer: m h f               (m = 3 for SwiGLU: gate, up, down; 2 for GeLU)
                 MoE layer:   k m h f_moe + h E   (the k routed experts, the router)
                              + m h f_shared      (shared expert, when there is one)
             + h V                                (LM head; the input embedding is a lookup)
    FLOPs per token = 6 N_active + 12 L n d s     (fwd + bwd of the weights; attention scores
                                                   and attention x V over the full s x s square)

Not counted: norms, softmax, activations, router top-k, the optimizer, biases.
MFU = achieved TFLOP/s per device / peak TFLOP/s per device (dense bf16; H100/H200 SXM: 989).
"""

from __future__ import annotations

from megamoe.model.config import ModelConfig


def active_parameters(config: ModelConfig) -> int:
    h = config.hidden_size
    m = 3 if config.swiglu else 2
    total = config.hidden_size * config.vocab_size
    attention = 2 * h * config.head_dim * (config.num_attention_heads + config.num_kv_heads)
    for layer in range(config.num_layers):
        total += attention
        if config.is_moe_layer(layer):
            experts = config.num_experts_for_layer(layer)
            total += config.moe_router_topk * m * h * config.moe_ffn_hidden_size + h * experts
            if config.moe_shared_expert_intermediate_size:
                total += m * h * config.moe_shared_expert_intermediate_size
        else:
            total += m * h * config.ffn_hidden_size
    return total


def flops_per_token(config: ModelConfig, seq_length: int) -> float:
    query_width = config.num_attention_heads * config.head_dim
    return 6.0 * active_parameters(config) + 12.0 * config.num_layers * query_width * seq_length


CUDA_PEAK_TFLOPS = 989.0  # dense bf16 of an H100/H200 SXM: the default --peak-tflops-per-device on CUDA


def default_peak_tflops(device: str) -> float | None:
    """--peak-tflops-per-device when not given: the H100/H200 peak on CUDA, none (no MFU) on CPU."""
    return CUDA_PEAK_TFLOPS if device == "cuda" else None


def mfu(tflops_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation, or None without a peak."""
    return tflops_per_device / peak_tflops if peak_tflops else None
