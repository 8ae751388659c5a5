"""Causal self-attention with heads split over the TP group.

x ``[b, s, h]`` (replicated over TP) -> fused QKV (column-parallel, weight ``[3, heads*d / TP, h]``)
-> SDPA (flash attention on CUDA) on this rank's ``heads / TP`` heads -> output projection
(row-parallel, summed over TP) -> ``[b, s, h]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.rope import RotaryEmbedding, apply_rotary
from megamoe.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamoe.parallel.random import get_rng_tracker
from megamoe.parallel.state import get_parallel_state


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | None = None) -> None:
        super().__init__()
        tp = get_parallel_state().tp_size
        self.local_heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        proj_size = config.num_attention_heads * config.head_dim
        self.qkv = ColumnParallelLinear(
            config.hidden_size,
            (3, proj_size),
            bias=config.add_bias_linear,
            init_std=config.init_method_std,
            dtype=config.params_dtype,
            device=device,
        )
        self.proj = RowParallelLinear(
            proj_size,
            config.hidden_size,
            bias=config.add_bias_linear,
            init_std=config.init_method_std / math.sqrt(2.0 * config.num_layers),
            dtype=config.params_dtype,
            device=device,
        )
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rotary_base) if config.position_embedding_type == "rope" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.local_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, s, d]
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(s, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0.0:
            with get_rng_tracker().fork():  # heads differ per TP rank: draw from the sharded stream
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return self.proj(out)
