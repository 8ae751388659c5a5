"""Top-k softmax router with the load-balancing and z auxiliary losses.

Shapes: ``T`` tokens of this rank's micro-batch (``b * s``), ``H`` hidden, ``E`` experts of the
layer, ``K`` = ``--moe-router-topk``.

    x_TH -> (input jitter, training only) -> logits_TE = x W^T in fp32
         -> top-k: expert_ids_TK, weights_TK (fp32, the combine weights)

Softmax before top-k (``--moe-router-pre-softmax``): ``weights = topk(softmax(logits))``,
optionally renormalised to sum to 1 over the K choices (``moe_router_renormalize``).
Softmax after top-k (the default): ``weights = softmax(topk(logits))``, which already sums to 1.

The router weight ``[E, H]`` is a dense parameter replicated over TP: every TP rank sees the
same tokens and must route them identically, so everything here is computed redundantly on
the TP ranks and nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.parallel.params import tag_param


@dataclass
class Routing:
    """What the router decided for the ``T`` tokens of this rank."""

    expert_ids: torch.Tensor  # [T, K] int64, global expert index of each token-slot
    weights: torch.Tensor  # [T, K] fp32, combine weight of each token-slot
    tokens_per_expert: torch.Tensor  # [E] int64, token-slots routed to each expert (before dropping)
    load_balancing_loss: torch.Tensor  # scalar fp32, un-weighted
    z_loss: torch.Tensor  # scalar fp32, un-weighted


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[num_experts]`` int64 histogram of ``expert_ids`` (any shape, values in ``[0, num_experts)``).

    A scatter-add rather than ``torch.bincount``, which reads the maximum back to the host on CUDA.
    """
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch/GShard loss ``E * sum_e f_e * P_e`` over the ``T`` tokens given.

    ``f_e = tokens_per_expert[e] / (T * K)`` is the fraction of token-slot assignments that went to
    expert e (no gradient: it comes from the discrete top-k), ``P_e`` the mean router probability
    of expert e (full softmax over all E).  Equals 1 for perfectly uniform routing.
    """
    num_tokens, num_experts = probs_TE.shape
    fraction_E = tokens_per_expert.to(probs_TE.dtype) / max(num_tokens * topk, 1)
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE), keeps the logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig, num_experts: int, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.topk = config.moe_router_topk
        self.pre_softmax = config.moe_router_pre_softmax
        self.renormalize = config.moe_router_renormalize
        self.jitter_eps = config.moe_input_jitter_eps
        self.weight = tag_param(
            nn.Parameter(torch.empty(num_experts, config.hidden_size, dtype=config.params_dtype, device=device)),
            tensor_parallel_dim=None,
            expert_parallel_size=None,
            init_std=config.init_method_std,
        )

    def _jitter(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Multiply the router input by ``U(1 - eps, 1 + eps)`` noise (training only).

        The noise comes from the default RNG stream of ``megamoe.parallel.random``, the one that
        is identical on the TP ranks: the model-parallel stream differs per TP rank, which would
        route the (replicated) tokens differently on each TP rank and sum unrelated partial
        expert outputs.  Seeded by ``model_parallel_seed``, it is reproducible.
        """
        if not self.training or self.jitter_eps == 0.0:
            return x_TH
        noise = torch.empty_like(x_TH).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return x_TH * noise

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = F.linear(self._jitter(x_TH).float(), self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.pre_softmax:
            weights_TK, expert_ids_TK = torch.topk(probs_TE, self.topk, dim=-1)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        else:
            top_logits_TK, expert_ids_TK = torch.topk(logits_TE, self.topk, dim=-1)
            weights_TK = torch.softmax(top_logits_TK, dim=-1)
        tokens_per_expert = count_per_expert(expert_ids_TK, self.num_experts)
        return Routing(
            expert_ids=expert_ids_TK,
            weights=weights_TK,
            tokens_per_expert=tokens_per_expert,
            load_balancing_loss=load_balancing_loss(probs_TE, tokens_per_expert, self.topk),
            z_loss=z_loss(logits_TE),
        )
