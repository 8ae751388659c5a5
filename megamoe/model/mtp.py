"""Multi-token prediction (DeepSeek-V3's MTP; ``--mtp-num-layers N``,
``--mtp-loss-scaling-factor``).

Depth ``k = 1..N`` predicts the token ``k + 1`` positions ahead.  With ``h_0`` the decoder's
output after the final norm, and ``e_k`` the embedding (the model's own, shared) of the input
tokens shifted ``k`` to the left::

    h_k = final_norm_k(block_k(eh_proj_k([enorm_k(e_k), hnorm_k(h_(k-1))])))     [b, s, h]
    loss_k = cross entropy of output_layer(h_k) (the model's own, shared) against the labels
             shifted k to the left; the last k positions of each sequence have no label there

``eh_proj`` ``[h, 2h]`` is row-parallel over its input features (each TP rank multiplies its
``2h / TP`` of the concatenation, the output summed over TP); ``block_k`` is a transformer layer
built like the decoder's last one (MoE when that is).  The model adds
``--mtp-loss-scaling-factor x mean_k loss_k`` to the loss (Megatron's and DeepSeek-V3's weight
``lambda``); the MoE blocks' auxiliary losses are added like the decoder's.  MTP runs only when
labels are given: logits and evaluation are the main model's.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.norm import Norm
from megamoe.parallel.layers import RowParallelLinear
from megamoe.parallel.mappings import tp_input
from megamoe.parallel.state import ParallelState


class MTPDepth(nn.Module):
    """One MTP depth around ``block`` (a transformer layer returning ``(x, moe aux or None)``)."""

    def __init__(self, config: ModelConfig, layout: ParallelState, block: nn.Module, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.enorm = Norm(config, dtype=dtype, device=device)
        self.hnorm = Norm(config, dtype=dtype, device=device)
        self.eh_proj = RowParallelLinear(2 * config.hidden_size, config.hidden_size, layout=layout,
                                         bias=config.add_bias_linear, init_std=config.init_method_std,
                                         dtype=dtype, device=device)
        self.block = block
        self.final_norm = Norm(config, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor):
        """hidden, embedded: ``[b, s, h]`` (with sequence parallelism this rank's ``[b, s / TP, h]``);
        returns ``h_k`` in the same shape and the block's MoE aux (or None)."""
        both = torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1)
        # The whole sequence (its gradient summed over TP in backward), then this rank's features.
        local = tp_input(both, self.layout).chunk(self.layout.tp_size, dim=-1)[self.layout.tp_rank]
        x, aux = self.block(self.eh_proj(local))
        return self.final_norm(x), aux


def shifted(labels: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth ``k``'s labels ``[b, s]`` (shifted ``k`` to the left) and token weights (``weights``,
    the main loss's, shifted alike with the last ``k`` positions dropped, renormalised to sum 1;
    all 0 when nothing is left)."""
    labels = torch.roll(labels, -k, dims=1)
    kept = torch.roll(weights, -k, dims=1)
    kept[:, -k:] = 0.0
    total = kept.sum()
    return labels, kept / torch.where(total > 0, total, torch.ones_like(total))
