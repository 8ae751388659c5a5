"""Model FLOPs per token and MFU, in the convention the peer frameworks' benchmarks use, so
that MFU compares across frameworks:

    N_active = sum over layers (the decoder's, then the N MTP blocks') of
                 2 h n d + 2 h G d                (q and output, k and v projections: n query heads,
                                                   G key/value heads of dim d; 4 h^2 for plain MHA)
                 MLA instead: [h rq + rq n (dn + dr)  or  h n (dn + dr)]   (queries, with or without q-lora)
                              + h (r + dr) + r n (dn + dv) + n dv h     (key/value latent and up, output)
               + dense layer: m h f               (m = 3 for SwiGLU: gate, up, down; 2 for GeLU)
                 MoE layer:   k m h f_moe + h E   (the k routed experts, the router)
                              + m h f_shared      (shared expert, when there is one)
             + h V                                (LM head; the input embedding is a lookup)
             + N (2 h^2 + h V)                    (each MTP depth: eh_proj, and the shared head again)
    FLOPs per token = 6 N_active + 6 (L + N) n (d_qk + d_v) s
                                                  (fwd + bwd of the weights; attention scores and
                                                   attention x V over the full s x s square; d_qk =
                                                   d_v = d, MLA: d_qk = dn + dr, d_v = dv)

Not counted: norms, softmax, activations, router top-k, the optimizer, biases.
MFU = achieved TFLOP/s per device / peak TFLOP/s per device (dense bf16, ``PEAK_TFLOPS_BY_DEVICE``).
"""

from __future__ import annotations

from megamoe.model.config import ModelConfig


def _attention_parameters(config: ModelConfig) -> int:
    h, n = config.hidden_size, config.num_attention_heads
    if not config.multi_latent_attention:
        return 2 * h * config.head_dim * (n + config.num_kv_heads)
    dn, dr, dv, r = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim, config.kv_lora_rank
    rq = config.q_lora_rank
    queries = h * n * (dn + dr) if rq is None else h * rq + rq * n * (dn + dr)
    return queries + h * (r + dr) + r * n * (dn + dv) + n * dv * h


def _score_width(config: ModelConfig) -> int:
    """``n (d_qk + d_v)``: the width of one position's attention scores and attention x V."""
    if config.multi_latent_attention:
        return config.num_attention_heads * (config.mla_query_head_dim + config.v_head_dim)
    return 2 * config.num_attention_heads * config.head_dim


def active_parameters(config: ModelConfig) -> int:
    h = config.hidden_size
    m = 3 if config.swiglu else 2
    depths = config.mtp_num_layers or 0
    total = config.hidden_size * config.vocab_size + depths * (2 * h * h + h * config.vocab_size)
    attention = _attention_parameters(config)
    for layer in (*range(config.num_layers), *config.mtp_layers):
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
    layers = config.num_layers + (config.mtp_num_layers or 0)
    return 6.0 * active_parameters(config) + 6.0 * layers * _score_width(config) * seq_length


# Dense bf16 peak TFLOP/s per device, by a part of the CUDA device name; the first match wins, so
# the PCIe and NVL variants of the H100 come before the SXM part's plain name.
PEAK_TFLOPS_BY_DEVICE = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak of the device called ``device_name`` (``torch.cuda.get_device_name``),
    or None for a device the table does not know (then no MFU is logged unless
    --peak-tflops-per-device gives it)."""
    for part, peak in PEAK_TFLOPS_BY_DEVICE:
        if part.lower() in device_name.lower():
            return peak
    return None


def mfu(tflops_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation, or None without a peak."""
    return tflops_per_device / peak_tflops if peak_tflops else None
