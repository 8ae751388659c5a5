"""MoELayer: router -> (capacity) -> all-to-all dispatch -> grouped experts -> combine.

    x [b, s, h] (replicated over TP)
      -> router (fp32 logits, top-k, aux and z losses over this rank's b*s tokens)
      -> keep mask (capacity mode only)
      -> dispatch over the layer's EP group -> this rank's experts (partial over TP)
      -> combine (weighted sum over the top-k slots) -> one all-reduce over TP
      -> + shared expert (optional dense MLP on every token)
    out [b, s, h] (replicated over TP), MoEAux

TP without sequence parallelism (ETP = TP): the expert input goes through ``copy_to_tp_region``
and so do the combine weights, because each TP rank only back-propagates its shard's partial
contribution to them; the all-reduce in their backward makes the gradients of x and of the
router full on every TP rank, as for a replicated parameter.  The forward sums the experts'
partial outputs with one ``reduce_from_tp_region`` after combining, instead of one per expert.

With sequence parallelism x is this TP rank's ``[b, s / TP, h]``: each rank routes, dispatches
and combines only its own tokens (each token crosses the all-to-all once), the dispatcher
gathers the rows of the ETP group for the expert GEMMs and sums their partial outputs back, and
nothing is reduced over TP here.  The router's aux and z losses are still those of the whole
micro-batch (see ``TopKRouter``); its weight gradient is partial over TP and is completed by the
optimizer's reduction rule, like every TP-replicated parameter's under sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.mlp import MLP
from megamoe.model.moe.aux_losses import count_per_expert
from megamoe.model.moe.capacity import capacity_keep_mask, expert_capacity
from megamoe.model.moe.dispatcher import TokenDispatcher
from megamoe.model.moe.experts import GroupedExperts
from megamoe.model.moe.router import TopKRouter
from megamoe.parallel.mappings import all_reduce_tp, copy_to_tp_region, reduce_from_tp_region
from megamoe.parallel.state import ParallelState


@dataclass
class MoEStats:
    """Detached per-layer values for logging (tensors: the trainer moves them to the host)."""

    tokens_per_expert: torch.Tensor  # [E] int64: token-slots of this rank routed to each global expert, before dropping
    kept_tokens_per_expert: torch.Tensor  # [E] int64: the same after capacity dropping (the expert-bias loads)
    dropped_fraction: torch.Tensor  # scalar fp32: dropped token-slots / (T * K); 0 when dropless
    aux_loss: torch.Tensor  # scalar fp32: load-balancing loss, un-weighted
    z_loss: torch.Tensor  # scalar fp32: router z-loss, un-weighted


@dataclass
class MoEAux:
    loss: torch.Tensor  # scalar fp32: moe_aux_loss_coeff * aux_loss + moe_z_loss_coeff * z_loss (in the graph)
    stats: MoEStats


class MoELayer(nn.Module):
    """The MoE block of transformer layer ``layer_number`` (its expert count comes from
    ``config.num_experts_for_layer``, its EP size from ``layout.ep_size_of_layer``); parameters
    in ``dtype``, experts through ``torch._grouped_mm`` when ``grouped_gemm``, SwiGLU, the combine and
    the dispatch's backward fused when ``fused_kernels`` (``megamoe.kernels.use_fused``)."""

    def __init__(
        self, config: ModelConfig, layer_number: int, layout: ParallelState, *, dtype: torch.dtype = torch.float32,
        grouped_gemm: bool = True, fused_kernels: bool = True, device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.num_experts = config.num_experts_for_layer(layer_number)
        self.ep_size = layout.ep_size_of_layer(config.decoder_layer_of(layer_number))
        self.topk = config.moe_router_topk
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff
        self.capacity_factor = config.moe_expert_capacity_factor
        self.eval_capacity_factor = config.moe_eval_capacity_factor
        self.drop_policy = config.moe_token_drop_policy
        self.router = TopKRouter(config, self.num_experts, layout, dtype=dtype, device=device)
        self.experts = GroupedExperts(config, layout, num_experts=self.num_experts, ep_size=self.ep_size,
                                      dtype=dtype, grouped_gemm=grouped_gemm, fused_kernels=fused_kernels,
                                      device=device)
        self.dispatcher = TokenDispatcher(layout, num_experts=self.num_experts, ep_size=self.ep_size,
                                          fused_kernels=fused_kernels)
        self.shared_expert = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_expert = MLP(
                config, layout, ffn_hidden_size=config.moe_shared_expert_intermediate_size, dtype=dtype,
                fused_kernels=fused_kernels, device=device,
            )

    def _active_capacity_factor(self) -> float | None:
        """Training uses --moe-expert-capacity-factor; eval --moe-eval-capacity-factor when set."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        b, s, hidden = x.shape
        x_TH = x.reshape(b * s, hidden)
        routing = self.router(x_TH, num_sequences=b)

        keep_TK = None
        factor = self._active_capacity_factor()
        if factor is not None:
            capacity = expert_capacity(
                num_tokens=b * s, topk=self.topk, num_experts=self.num_experts, capacity_factor=factor
            )
            keep_TK = capacity_keep_mask(
                routing.expert_ids, routing.weights, num_experts=self.num_experts, capacity=capacity,
                policy=self.drop_policy,
            )

        plan = self.dispatcher.plan(routing.expert_ids, keep_TK)
        own_tokens = self.layout.sequence_parallel
        x_in = x_TH if own_tokens else copy_to_tp_region(x_TH, self.layout)
        x_NH = self.dispatcher.dispatch(x_in, plan)
        y_NH = self.experts(x_NH, plan.expert_counts, plan.expert_offsets)
        weights_TK = routing.weights if own_tokens else copy_to_tp_region(routing.weights, self.layout)
        out_TH = self.dispatcher.combine(y_NH, weights_TK, plan)
        if not own_tokens:
            out_TH = reduce_from_tp_region(out_TH, self.layout)
        if self.shared_expert is not None:
            out_TH = out_TH + self.shared_expert(x).reshape(b * s, hidden)  # with SP, a non-contiguous [b, s/TP, h]

        loss = self.aux_loss_coeff * routing.load_balancing_loss + self.z_loss_coeff * routing.z_loss
        if keep_TK is None:
            dropped = torch.zeros((), dtype=torch.float32, device=x.device)
            kept = routing.tokens_per_expert
        else:
            dropped = 1.0 - keep_TK.float().mean()
            kept = count_per_expert(routing.expert_ids[keep_TK], self.num_experts)
            if own_tokens:
                kept = all_reduce_tp(kept, self.layout)
        stats = MoEStats(
            tokens_per_expert=routing.tokens_per_expert.detach(),
            kept_tokens_per_expert=kept.detach(),
            dropped_fraction=dropped,
            aux_loss=routing.load_balancing_loss.detach(),
            z_loss=routing.z_loss.detach(),
        )
        return out_TH.view(b, s, hidden), MoEAux(loss=loss, stats=stats)
