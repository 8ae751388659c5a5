"""Causal self-attention (multi-head or grouped-query) with heads split over the TP group.

``n`` query heads, ``G`` key/value heads (``--num-query-groups``; ``G = n`` without
``--group-query-attention``), ``r = n / G`` query heads per group, ``d`` the head dim:

    x [b, s, h] (replicated over TP; with sequence parallelism this rank's [b, s / TP, h],
                 all-gathered by the QKV layer)
      -> fused QKV, column-parallel: weight [r + 2, G*d / TP, h]
         (rows 0..r-1: query head ``g*r + i`` of group g in row i; row r: key; row r+1: value)
      -> (--qk-layernorm: a norm over d of each query and key head)
      -> RoPE -> SDPA (flash attention on CUDA) on this rank's G/TP groups (n/TP query heads)
      -> output projection (row-parallel, summed over TP; reduce-scattered with sequence
         parallelism) -> x's shape

The fused weight's TP split falls on the group dim, so each rank holds whole groups: their
query heads and their key/value head.  With ``r = 1`` the weight is ``[3, n*d, h]`` (plain
multi-head attention).  Query head ``g*r + i`` attends with key/value head ``g`` (SDPA's
``enable_gqa`` convention, and Hugging Face's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.norm import Norm
from megamoe.model.rope import RotaryEmbedding, apply_rotary
from megamoe.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamoe.parallel.mappings import copy_to_tp_region
from megamoe.parallel.random import RNGStatesTracker
from megamoe.parallel.state import ParallelState


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout: float, rng: RNGStatesTracker,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal SDPA of this TP rank's heads: q ``[b, n, s, d]``, k ``[b, n or G, s, d]``, v
    ``[b, n or G, s, dv]`` -> ``[b, n, s, dv]``; ``scale`` None is ``1 / sqrt(d)``.  Attention
    dropout draws from the TP-sharded stream of ``rng`` (the layout's: the heads differ per TP rank)."""
    gqa = {"enable_gqa": True} if enable_gqa else {}
    if dropout > 0.0:
        with rng.fork():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, **gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)


class HeadNorm(Norm):
    """``--normalization`` over the head dim of ``[..., d]``; one weight shared by all heads.

    The weight is replicated over TP but each TP rank normalises only its own heads, so its
    gradient is summed over TP in backward (``copy_to_tp_region``): every rank then holds the
    full gradient, as for the other replicated norm weights.  With sequence parallelism the
    optimizer's reduction rule sums every TP-replicated gradient over TP, so the sum is left to it.
    """

    def __init__(self, config: ModelConfig, layout: ParallelState, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout.sequence_parallel:
            return self.normalize(x, self.weight, self.bias)
        bias = None if self.bias is None else copy_to_tp_region(self.bias, self.layout)
        return self.normalize(x, copy_to_tp_region(self.weight, self.layout), bias)


class _SplitHeads(torch.autograd.Function):
    """q, k, v out of the fused projection ``[b, s, (r+2) * G * d]``; the backward writes their
    gradients straight into the projection's layout (three copies), where autograd's would stack
    them and then copy the stack into that layout."""

    @staticmethod
    def forward(ctx, x, r: int, groups: int, head_dim: int):
        b, s, _ = x.shape
        ctx.shape = (b, s, r + 2, groups, head_dim)
        qkv = x.view(ctx.shape)
        q = qkv[:, :, :r].permute(0, 3, 2, 1, 4).reshape(b, groups * r, s, head_dim)
        return q, qkv[:, :, r].transpose(1, 2), qkv[:, :, r + 1].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        b, s, r_plus_2, groups, head_dim = ctx.shape
        r = r_plus_2 - 2
        # autograd materialises an unused output's gradient as zeros: all three are tensors here
        grad = torch.empty(ctx.shape, dtype=grad_q.dtype, device=grad_q.device)
        grad[:, :, :r].copy_(grad_q.reshape(b, groups, r, s, head_dim).permute(0, 3, 2, 1, 4))
        grad[:, :, r].copy_(grad_k.transpose(1, 2))
        grad[:, :, r + 1].copy_(grad_v.transpose(1, 2))
        return grad.view(b, s, -1), None, None, None


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelState, *, dtype: torch.dtype = torch.float32,
                 fused_kernels: bool = True, device: torch.device | None = None) -> None:
        super().__init__()
        tp = layout.tp_size
        self.fused_kernels = fused_kernels
        self.rng = layout.rng
        self.local_groups = config.num_kv_heads // tp
        self.heads_per_group = config.num_attention_heads // config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.qkv = ColumnParallelLinear(
            config.hidden_size,
            (self.heads_per_group + 2, config.num_kv_heads * config.head_dim),
            layout=layout,
            bias=config.add_bias_linear,
            init_std=config.init_method_std,
            dtype=dtype,
            device=device,
        )
        self.proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            layout=layout,
            bias=config.add_bias_linear,
            init_std=config.output_layer_init_std,
            dtype=dtype,
            device=device,
        )
        self.q_norm = self.k_norm = None
        if config.qk_layernorm:
            self.q_norm = HeadNorm(config, layout, size=config.head_dim, dtype=dtype, device=device)
            self.k_norm = HeadNorm(config, layout, size=config.head_dim, dtype=dtype, device=device)
        self.rotary = (
            RotaryEmbedding(config.head_dim, config) if config.position_embedding_type == "rope" else None
        )

    def _split_heads(self, x: torch.Tensor):
        """Fused projection ``[b, s, (r+2) * G_local * d]`` -> q ``[b, n_local, s, d]``, k and v
        ``[b, G_local, s, d]`` (views where possible)."""
        return _SplitHeads.apply(x, self.heads_per_group, self.local_groups, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # the whole sequence, also with sequence parallelism
        b, s = qkv.shape[:2]
        q, k, v = self._split_heads(qkv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(s, x.device, q.dtype)
            q, k = (apply_rotary(t, cos, sin, fused=self.fused_kernels) for t in (q, k))
        dropout = self.dropout if self.training else 0.0
        out = causal_attention(q, k, v, dropout=dropout, rng=self.rng, enable_gqa=self.heads_per_group > 1)
        out = out.transpose(1, 2).reshape(b, s, q.shape[1] * self.head_dim)
        return self.proj(out)
