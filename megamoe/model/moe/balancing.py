"""Aux-loss-free load balancing (--moe-router-enable-expert-bias): the per-step bias update.

After each optimizer step that was not skipped, every router with an expert bias moves it by
``rate * sign(mean load - load)`` (``router.bias_step``), where the loads are the token-slots
each expert processed during the whole step (after capacity dropping, as Megatron counts them): summed over the step's micro-batches here and over
every rank of the pipeline stage holding the layer (the world at PP 1) by one all-reduce, so every rank applies the same update whatever the
layout.  (TP ranks route the same tokens and so count them TP times; only the signs of the
load errors matter, and those do not change.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megamoe.model.moe.router import TopKRouter


def start_step(model: nn.Module) -> None:
    """Call before each optimizer step's first micro-batch: ``global_aux_loss`` counts the step's
    micro-batches from here."""
    for router in model.modules():
        if isinstance(router, TopKRouter):
            router.start_step()


def biased_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of ``model`` that carry an expert bias, in MoE-layer order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]


@torch.no_grad()
def update_expert_biases(model: nn.Module, step_moe_stats: list[list]) -> None:
    """Collective over the routers' pipeline stage (the world at PP 1) when ``model`` has biased routers (else a
    no-op, no collective: every rank of a stage holds the same routers).

    ``step_moe_stats``: one ``GPTOutput.moe_stats`` per micro-batch of the step (each a list with
    one ``MoEStats`` per MoE layer).  Every MoE layer has a router with a bias when the option
    is on, so the stats and the routers pair up in layer order.
    """
    routers = biased_routers(model)
    if not routers:
        return
    per_layer = [torch.stack([stats[i].kept_tokens_per_expert for stats in step_moe_stats]).sum(0)
                 for i in range(len(routers))]
    flat = torch.cat(per_layer)
    layout = routers[0].layout
    if layout.stage_size > 1:
        dist.all_reduce(flat, group=layout.stage_group)
    for router, loads in zip(routers, flat.split([r.num_experts for r in routers])):
        router.update_expert_bias(loads)
