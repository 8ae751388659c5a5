"""Model FLOPs per token, in the convention of ../shared/bench/peer_gpu.py, so that MFU compares.

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
