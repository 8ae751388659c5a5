"""Megatron-Core's router definitions (0.16: ``transformer/moe/moe_utils.py`` and ``router.py``),
transcribed from their documented behaviour for the parity tests; single process, dense
``[tokens, experts]`` maps as Megatron keeps them, tokens in Megatron's order (sequence-major:
token ``s * B + b``).  Not megamoe code: nothing in megamoe imports this.
"""

from __future__ import annotations

import math

import torch


def topk_routing(logits, topk, *, pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None,
                 score_function="softmax", expert_bias=None):
    """``(probs [T, E], routing_map [T, E] bool)``: the combine weight of each chosen expert
    (zero elsewhere) and the choice."""
    num_tokens, num_experts = logits.shape

    def pick(scores):
        if not group_topk:
            return torch.topk(scores, topk, dim=1)
        per_group_best = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1).values.sum(-1)
        groups = torch.topk(per_group_best, group_topk, dim=-1).indices
        group_mask = torch.zeros_like(per_group_best).scatter(1, groups, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups)
        return torch.topk(scores.masked_fill(expert_mask.reshape(num_tokens, -1) == 0, float("-inf")), topk, dim=-1)

    if score_function == "softmax":
        if pre_softmax:
            probs, chosen = pick(torch.softmax(logits, dim=-1))
        else:
            top_logits, chosen = pick(logits)
            probs = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        if expert_bias is None:
            picked, chosen = pick(scores)
        else:
            _, chosen = pick(scores + expert_bias)
            picked = scores.gather(1, chosen)
        probs = picked / (picked.sum(-1, keepdim=True) + 1e-20) if topk > 1 else picked
    if scaling_factor:
        probs = probs * scaling_factor
    dense = torch.zeros_like(logits).scatter(1, chosen, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, chosen, 1).bool()
    return dense, routing_map


def aux_loss_scores(logits, topk, score_function):
    """``(routing_map, scores)`` the balancing losses use: unbiased scores (softmax, or sigmoid
    normalised over the experts) and their plain top-k."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        sig = torch.sigmoid(logits)
        scores = sig / (sig.sum(-1, keepdim=True) + 1e-20)
    chosen = torch.topk(scores, topk, dim=1).indices
    return torch.zeros_like(logits, dtype=torch.int32).scatter(1, chosen, 1).bool(), scores


def switch_loss(probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff=1.0):
    """``sum_e(sum_t probs[t, e] * tokens_per_expert[e]) * E * coeff / (K * T^2)``."""
    return (probs.sum(0) * tokens_per_expert).sum() * (num_experts * coeff / (topk * total_num_tokens ** 2))


def aux_loss(logits, topk, score_function):
    routing_map, scores = aux_loss_scores(logits, topk, score_function)
    return switch_loss(scores, routing_map.sum(0), logits.shape[0], topk, logits.shape[1])


def seq_aux_loss(logits, topk, score_function, *, seq_length, batch):
    """Tokens are sequence-major: reshaping ``[S * B, E]`` to ``[S, B * E]`` makes every
    (sequence, expert) pair an expert of its own; the sum over them / B."""
    routing_map, scores = aux_loss_scores(logits, topk, score_function)
    scores = scores.reshape(seq_length, -1)
    counts = routing_map.reshape(seq_length, -1).sum(0)
    return switch_loss(scores, counts, seq_length, topk, logits.shape[1]) / batch


class GlobalAuxLoss:
    """``global_aux_loss`` of one data-parallel rank: the counts summed over every rank, their
    running mean over the step's micro-batches, the total token count over every rank."""

    def __init__(self, num_experts):
        self.counts = torch.zeros(num_experts, dtype=torch.float32)
        self.steps = 0

    def __call__(self, logits, topk, score_function, *, counts_of_all_ranks=None, num_ranks=1):
        routing_map, scores = aux_loss_scores(logits, topk, score_function)
        counts = routing_map.sum(0).float() if counts_of_all_ranks is None else counts_of_all_ranks
        self.counts += counts
        self.steps += 1
        total = logits.shape[0] * num_ranks
        return switch_loss(scores, self.counts / self.steps, total, topk, logits.shape[1])


def z_loss(logits):
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity(num_tokens, num_experts, capacity_factor):
    return math.ceil(num_tokens / num_experts * capacity_factor)


def drop_tokens(probs, routing_map, topk, capacity_factor):
    """The ``probs`` drop policy: each expert keeps its ``capacity`` highest-probability tokens."""
    num_tokens, num_experts = probs.shape
    cap = capacity(num_tokens * topk, num_experts, capacity_factor)
    if cap > num_tokens:
        return probs, routing_map
    kept = torch.topk(probs, cap, dim=0).indices
    keep_mask = torch.zeros_like(probs).scatter(0, kept, 1).bool()
    return probs * (routing_map & keep_mask), routing_map & keep_mask


def updated_expert_bias(tokens_per_expert, expert_bias, rate):
    mean = tokens_per_expert.sum(-1, keepdim=True) / tokens_per_expert.shape[-1]
    return expert_bias + torch.sign(mean - tokens_per_expert) * rate
