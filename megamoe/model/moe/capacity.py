"""Expert capacity and token dropping (``--moe-expert-capacity-factor``).

Each expert accepts at most ``capacity = ceil(factor * T * K / E)`` token-slots of the ``T``
tokens this rank routes (``K`` = top-k, ``E`` experts).  The capacity is a property of this
rank's micro-batch, not of the EP layout: whichever rank holds the expert, the same slots are
kept.  Which slots an over-full expert keeps is the drop policy:

* ``probs``: the slots with the highest combine weight (ties: the earlier slot);
* ``position``: the earliest tokens of the micro-batch (slot order ``t * K + j``).

A dropped slot contributes nothing to its token's output; a token whose every slot is dropped
leaves the MoE layer as zero and passes through the transformer layer's residual unchanged.
"""

from __future__ import annotations

import math

import torch

from megamoe.model.moe.aux_losses import count_per_expert

DROP_POLICIES = ("probs", "position")


def expert_capacity(*, num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Token-slots one expert may take: ``ceil(capacity_factor * num_tokens * topk / num_experts)``."""
    return math.ceil(capacity_factor * num_tokens * topk / num_experts)


def capacity_keep_mask(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    num_experts: int,
    capacity: int,
    policy: str,
) -> torch.Tensor:
    """``[T, K]`` bool: True for the token-slots their expert keeps under ``capacity``.

    Sort the slots by (expert, priority) and keep the first ``capacity`` of each expert's run;
    no loop over tokens or experts.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"--moe-token-drop-policy {policy!r}: valid values are {list(DROP_POLICIES)}")
    slot_expert_S = expert_ids_TK.reshape(-1)
    num_slots = slot_expert_S.numel()
    if policy == "probs":
        by_priority_S = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    else:
        by_priority_S = torch.arange(num_slots, device=slot_expert_S.device)
    # A stable sort by expert keeps the priority order inside each expert's run.
    order_S = by_priority_S[torch.argsort(slot_expert_S[by_priority_S], stable=True)]
    counts_E = count_per_expert(slot_expert_S, num_experts)
    run_start_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_in_expert_S = torch.arange(num_slots, device=slot_expert_S.device) - run_start_E[slot_expert_S[order_S]]
    keep_S = torch.empty(num_slots, dtype=torch.bool, device=slot_expert_S.device)
    keep_S[order_S] = rank_in_expert_S < capacity
    return keep_S.view_as(expert_ids_TK)
