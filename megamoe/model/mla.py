"""Multi-latent attention (MLA, DeepSeek-V2/V3; ``--multi-latent-attention``) with heads split
over the TP group.

``n`` heads, each with a query/key part without position ``dn`` (``--qk-head-dim``), a RoPE
part ``dr`` (``--qk-pos-emb-head-dim``) and a value of ``dv`` (``--v-head-dim``); latent ranks
``rq`` (``--q-lora-rank``) and ``r`` (``--kv-lora-rank``)::

    x [b, s, h] (with sequence parallelism this rank's [b, s / TP, h])
      queries: q_down [rq, h] (replicated) -> q_norm -> q_up [n (dn + dr) / TP, rq] (column-parallel)
               or, without --q-lora-rank, q_proj [n (dn + dr) / TP, h] (column-parallel)
      keys/values: kv_down [r + dr, h] (replicated) -> latent [.., r] and the shared RoPE key [.., dr]
               latent -> kv_norm -> kv_up [n (dn + dv) / TP, r] (column-parallel): k_nope, v per head
      q = [q_nope, rope(q_rope)], k = [k_nope, rope(k_rope) (the same for every head)]
      -> causal SDPA with scale mscale^2 / sqrt(dn + dr) on this rank's n / TP heads
      -> proj [h, n dv / TP] (row-parallel, summed over TP)

The norms (``--qk-layernorm``: Megatron's meaning under MLA) act on the latents.  The down
projections and the latent norms are replicated over TP and run on the rank's own tokens (its
part of the sequence under sequence parallelism); their outputs reach the heads through
``tp_input`` (inside the column-parallel layers, and explicitly for the shared RoPE key), whose
backward sums the TP ranks' heads, so their gradients are complete without sequence parallelism
and each rank's share of its positions with it (summed over TP by the optimizer's rule).
Rows of the column-parallel weights are head-major, so a TP rank's slice is whole heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.model.attention import causal_attention
from megamoe.model.config import ModelConfig
from megamoe.model.norm import Norm
from megamoe.model.rope import RotaryEmbedding, apply_rotary, softmax_mscale
from megamoe.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from megamoe.parallel.mappings import tp_input
from megamoe.parallel.state import ParallelState


class MultiLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelState, *, dtype: torch.dtype = torch.float32,
                 fused_kernels: bool = True, device: torch.device | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.fused_kernels = fused_kernels
        self.rng = layout.rng
        n, h = config.num_attention_heads, config.hidden_size
        self.local_heads = n // layout.tp_size
        self.dn, self.dr, self.dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.dropout = config.attention_dropout
        common = dict(bias=config.add_bias_linear, init_std=config.init_method_std, dtype=dtype,
                      device=device)
        query_width = n * (self.dn + self.dr)
        self.q_down = self.q_norm = self.q_up = self.q_proj = None
        if config.q_lora_rank is not None:
            self.q_down = ReplicatedLinear(h, config.q_lora_rank, **common)
            if config.qk_layernorm:
                self.q_norm = Norm(config, size=config.q_lora_rank, dtype=dtype, device=device)
            self.q_up = ColumnParallelLinear(config.q_lora_rank, query_width, layout=layout, **common)
        else:
            self.q_proj = ColumnParallelLinear(h, query_width, layout=layout, **common)
        self.kv_down = ReplicatedLinear(h, self.kv_rank + self.dr, **common)
        self.kv_norm = Norm(config, size=self.kv_rank, dtype=dtype, device=device) if config.qk_layernorm else None
        self.kv_up = ColumnParallelLinear(self.kv_rank, n * (self.dn + self.dv), layout=layout, **common)
        self.proj = RowParallelLinear(n * self.dv, h, layout=layout, **{**common, "init_std": config.output_layer_init_std})
        self.rotary = RotaryEmbedding(self.dr, config)
        self.scale = softmax_mscale(config) / math.sqrt(self.dn + self.dr)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, n/TP (dn + dr)]`` over the whole sequence."""
        if self.q_proj is not None:
            return self.q_proj(x)
        latent = self.q_down(x)
        if self.q_norm is not None:
            latent = self.q_norm(latent)
        return self.q_up(latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q = self._queries(x)
        s = q.shape[1]
        q_nope, q_rope = q.view(b, s, self.local_heads, self.dn + self.dr).transpose(1, 2).split([self.dn, self.dr], -1)
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.dr], dim=-1)
        if self.kv_norm is not None:
            latent = self.kv_norm(latent)
        kv = self.kv_up(latent).view(b, s, self.local_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k_rope = tp_input(k_rope, self.layout).unsqueeze(1)  # [b, 1, s, dr]: the whole sequence, shared by the heads
        cos, sin = self.rotary.cos_sin(s, x.device, q.dtype)
        q = torch.cat([q_nope, apply_rotary(q_rope, cos, sin, fused=self.fused_kernels)], dim=-1)
        k_rope = apply_rotary(k_rope, cos, sin, fused=self.fused_kernels).expand(-1, self.local_heads, -1, -1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = causal_attention(q, k, v, dropout=self.dropout if self.training else 0.0, rng=self.rng,
                               scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.dv))
