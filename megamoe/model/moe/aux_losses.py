"""The router's auxiliary losses, as Megatron-Core defines them: three load-balancing losses
(``--moe-router-load-balancing-type``) and the z loss.

Shapes: ``T`` tokens, ``E`` experts, ``K`` = top-k, ``B`` sequences of the micro-batch.

All three balancing losses are Switch Transformer's ``E * sum_e f_e * P_e``: ``f_e`` the
fraction of the token-slots chosen for expert e (counts, no gradient), ``P_e`` the mean router
probability of expert e over the tokens (the gradient flows through it).  They differ in the
tokens over which f and P are taken:

* ``aux_loss``: the micro-batch (GShard, Switch);
* ``seq_aux_loss``: each sequence on its own, the losses averaged over the sequences
  (DeepSeek-V2's sequence-wise balance loss);
* ``global_aux_loss``: f over every micro-batch of the step so far on every data-parallel rank
  (the running mean of their counts), P over the micro-batch (Qiu et al., "Demystifying the
  load balancing loss", arXiv 2501.11873).

The counts of all three come from a plain top-k of the unbiased scores (softmax, or the sigmoid
scores normalised over E), whatever the routing itself chose with an expert bias or a group
limit: Megatron's ``compute_routing_scores_for_aux_loss``.  ``none`` has no balancing loss; its
value is still the ``aux_loss`` one, logged with weight 0.
"""

from __future__ import annotations

import torch


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[num_experts]`` int64 histogram of ``expert_ids`` (any shape, values in ``[0, num_experts)``).

    A scatter-add rather than ``torch.bincount``, which reads the maximum back to the host on CUDA.
    """
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def balancing_choice(probs_TE: torch.Tensor, topk: int) -> torch.Tensor:
    """``[T, K]``: the experts the balancing losses count, a plain top-k of the unbiased scores."""
    return torch.topk(probs_TE, topk, dim=-1).indices


def load_balancing_loss(
    probs_TE: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int, num_tokens: int | None = None
) -> torch.Tensor:
    """Switch/GShard loss ``E * sum_e f_e * P_e`` over ``num_tokens`` tokens (default: the ``T``
    given; more when ``probs_TE`` holds only a share of them).

    ``f_e = tokens_per_expert[e] / (num_tokens * K)``; ``P_e`` the probability of expert e summed
    over the given tokens and divided by ``num_tokens``.  Equals 1 for perfectly uniform routing.
    ``tokens_per_expert`` may be fractional (a mean of counts, for ``global_aux_loss``).
    """
    num_experts = probs_TE.shape[1]
    num_tokens = probs_TE.shape[0] if num_tokens is None else num_tokens
    fraction_E = tokens_per_expert.to(probs_TE.dtype) / max(num_tokens * topk, 1)
    return num_experts * (fraction_E * probs_TE.sum(dim=0) / max(num_tokens, 1)).sum()


def sequence_counts(expert_ids_TK: torch.Tensor, num_sequences: int, num_experts: int) -> torch.Tensor:
    """``[B, E]`` int64: the token-slots of each sequence routed to each expert; the ``T`` tokens
    are ``B`` sequences of ``T / B`` consecutive tokens."""
    ids_BN = expert_ids_TK.reshape(num_sequences, -1)
    offsets_B1 = num_experts * torch.arange(num_sequences, device=ids_BN.device).unsqueeze(1)
    return count_per_expert(ids_BN + offsets_B1, num_sequences * num_experts).view(num_sequences, num_experts)


def sequence_load_balancing_loss(
    probs_TE: torch.Tensor, counts_BE: torch.Tensor, topk: int, seq_length: int
) -> torch.Tensor:
    """``seq_aux_loss``: the mean over the ``B`` sequences of each sequence's own Switch loss.

    ``probs_TE``: this rank's tokens, ``B`` runs of consecutive tokens, one per sequence (all
    ``seq_length`` of them, or a share under sequence parallelism); ``counts_BE``: each
    sequence's counts over all its ``seq_length`` tokens.  ``f_be = counts_be / (seq_length * K)``,
    ``P_be`` = the probabilities summed over the given tokens of sequence b / ``seq_length``.
    """
    num_sequences, num_experts = counts_BE.shape
    probs_BE = probs_TE.view(num_sequences, -1, num_experts).sum(dim=1) / seq_length
    fraction_BE = counts_BE.to(probs_TE.dtype) / (seq_length * topk)
    return num_experts * (fraction_BE * probs_BE).sum() / num_sequences


def z_loss(logits_TE: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE), keeps the logits small; the sum
    over the given tokens is divided by ``num_tokens`` (default: their count)."""
    num_tokens = logits_TE.shape[0] if num_tokens is None else num_tokens
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(num_tokens, 1)
