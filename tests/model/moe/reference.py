"""A plain-torch MoE written for the tests, independent of megamoe.model.moe's code path.

It consumes the *full* weights (experts in global order, as ``gather_full_state`` returns them),
loops over the experts with boolean masks, applies the capacity rule with a Python loop over
each expert's slots, and runs in whatever dtype it is given (the tests use fp64).  No sorting,
no all-to-all, no grouped GEMM.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def reference_routing(x_TH, router_weight, *, topk, pre_softmax, router_bias=None):
    """-> (expert_ids [T, K], weights [T, K], probs [T, E], logits [T, E])."""
    logits = x_TH @ router_weight.t()
    if router_bias is not None:
        logits = logits + router_bias
    probs = torch.softmax(logits, dim=-1)
    if pre_softmax:
        weights, ids = torch.topk(probs, topk, dim=-1)
    else:
        top, ids = torch.topk(logits, topk, dim=-1)
        weights = torch.softmax(top, dim=-1)
    return ids, weights, probs, logits


def reference_keep(ids, weights, *, num_experts, capacity, policy):
    """[T, K] bool by brute force: per expert, rank its slots by priority and keep ``capacity``."""
    num_tokens, topk = ids.shape
    keep = torch.zeros(num_tokens, topk, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(t, j) for t in range(num_tokens) for j in range(topk) if ids[t, j] == e]
        if policy == "probs":
            slots.sort(key=lambda tj: -float(weights[tj[0], tj[1]]))  # stable: ties keep slot order
        for t, j in slots[:capacity]:
            keep[t, j] = True
    return keep


def expert_forward(x, fc1, fc2, *, swiglu, fc1_bias=None, fc2_bias=None):
    """One expert (or a dense MLP): fc1 [2, F, H] (SwiGLU) or [F, H], fc2 [H, F]; optional biases
    fc1_bias [2, F] / [F] and fc2_bias [H]."""
    if fc1_bias is None:
        fc1_bias = torch.zeros(fc1.shape[:-1], dtype=x.dtype)
    if swiglu:
        hidden = F.silu(x @ fc1[0].t() + fc1_bias[0]) * (x @ fc1[1].t() + fc1_bias[1])
    else:
        hidden = F.gelu(x @ fc1.t() + fc1_bias)
    out = hidden @ fc2.t()
    return out if fc2_bias is None else out + fc2_bias


def reference_moe(x_TH, weights_by_name, *, prefix="", cfg, num_experts, capacity_factor=None):
    """Full MoE block on ``x_TH``.  ``weights_by_name`` maps the MoELayer's parameter names
    (under ``prefix``) to full tensors.  Returns a namespace with out [T, H], load_balancing,
    z, tokens_per_expert [E], dropped (number of dropped slots)."""
    w = lambda name: weights_by_name[prefix + name]  # noqa: E731
    topk = cfg.moe_router_topk
    ids, weights, probs, logits = reference_routing(
        x_TH, w("router.weight"), topk=topk, pre_softmax=cfg.moe_router_pre_softmax,
        router_bias=weights_by_name.get(prefix + "router.bias"),
    )
    if cfg.moe_router_topk_scaling_factor is not None:
        weights = weights * cfg.moe_router_topk_scaling_factor
    num_tokens = x_TH.shape[0]
    counts = torch.stack([(ids == e).sum() for e in range(num_experts)])
    fraction = counts.to(x_TH.dtype) / (num_tokens * topk)
    load_balancing = num_experts * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    keep = torch.ones_like(ids, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * num_tokens * topk / num_experts)
        keep = reference_keep(ids, weights.detach(), num_experts=num_experts, capacity=capacity,
                              policy=cfg.moe_token_drop_policy)
    out = torch.zeros_like(x_TH)
    fc1, fc2 = w("experts.fc1"), w("experts.fc2")
    fc1_bias = weights_by_name.get(prefix + "experts.fc1_bias")
    fc2_bias = weights_by_name.get(prefix + "experts.fc2_bias")
    for e in range(num_experts):
        biases = {} if fc1_bias is None else dict(fc1_bias=fc1_bias[e], fc2_bias=fc2_bias[e])
        for j in range(topk):
            rows = ((ids[:, j] == e) & keep[:, j]).nonzero().flatten()
            y = expert_forward(x_TH[rows], fc1[e], fc2[e], swiglu=cfg.swiglu, **biases)
            out = out.index_add(0, rows, weights[rows, j].unsqueeze(-1) * y)
    if cfg.moe_shared_expert_intermediate_size:
        out = out + expert_forward(
            x_TH, w("shared_expert.fc1.weight"), w("shared_expert.fc2.weight"), swiglu=cfg.swiglu,
            fc1_bias=weights_by_name.get(prefix + "shared_expert.fc1.bias"),
            fc2_bias=weights_by_name.get(prefix + "shared_expert.fc2.bias"),
        )
    return SimpleNamespace(out=out, load_balancing=load_balancing, z=z, tokens_per_expert=counts,
                           dropped=int((~keep).sum()))


class ReferenceMoEBlock(nn.Module):
    """Drop-in for a GPT model's MoELayer: adopts its parameters (same names, so gradients can
    be compared by name) and computes with ``reference_moe``.  Use at TP=1, EP=1, where the
    local parameters are the full tensors."""

    def __init__(self, layer, cfg) -> None:
        super().__init__()
        self.router, self.experts, self.shared_expert = layer.router, layer.experts, layer.shared_expert
        self.cfg, self.num_experts = cfg, layer.num_experts

    def forward(self, x):
        b, s, h = x.shape
        weights = dict(self.named_parameters())
        ref = reference_moe(x.reshape(b * s, h), weights, cfg=self.cfg, num_experts=self.num_experts)
        loss = self.cfg.moe_aux_loss_coeff * ref.load_balancing + self.cfg.moe_z_loss_coeff * ref.z
        stats = SimpleNamespace(aux_loss=ref.load_balancing.detach(), z_loss=ref.z.detach())
        return ref.out.view(b, s, h), SimpleNamespace(loss=loss, stats=stats)
