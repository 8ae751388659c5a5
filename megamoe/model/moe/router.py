"""Top-k router: score functions, group-limited choice, expert bias, and the auxiliary losses.

Shapes: ``T`` tokens of this rank's micro-batch (``b * s``), ``H`` hidden, ``E`` experts of the
layer, ``K`` = ``--moe-router-topk``, ``G`` = ``--moe-router-num-groups``.

    x_TH -> (input jitter, training only) -> logits_TE = x W^T in fp32
         -> choice scores -> (group limit) -> top-k: expert_ids_TK
         -> weights_TK (fp32, the combine weights) -> x --moe-router-topk-scaling-factor

``route`` holds the whole rule; by score function:

* softmax, the default (softmax after top-k): choose on the logits, ``weights = softmax(chosen
  logits)``, which already sums to 1.
* softmax with ``--moe-router-pre-softmax``: ``scores = softmax(logits)`` over all E, choose on
  them, ``weights = chosen scores``, not renormalised (they sum to less than 1).
* sigmoid: ``scores = sigmoid(logits)``, choose on them, ``weights = chosen scores``, divided by
  their sum when K > 1 (unless --no-moe-router-renormalize, a megamoe-only option for Hugging
  Face models with ``norm_topk_prob`` false).  With --moe-router-enable-expert-bias
  the choice is made on ``scores + expert_bias`` while the weights keep the unbiased scores
  (aux-loss-free balancing: the bias steers the choice and never enters the gradient).

These are Megatron-Core's rules (``topk_routing_with_score_function``), so a Megatron launch
script's router flags mean the same here.  With linear biases on (no --disable-bias-linear) the
router has a learned bias ``[E]`` added to the logits, as Megatron-Core's.  It starts at zero,
like megamoe's other biases (Megatron-Core draws it like the weight): a random initial shift of
the logits changes no function the model can learn, and a zero start keeps the first routing
that of the weight alone.

Group-limited routing (``--moe-router-num-groups G --moe-router-group-topk g``): the E experts
form G consecutive groups; each group is scored by the sum of its top ``K // g`` choice scores,
each token keeps its g best groups and takes its K experts from those only.

The expert bias ``[E]`` (fp32, a persistent buffer, saved with the model) moves after every
optimizer step by ``rate * sign(mean load - load)`` (``bias_step``), from the loads of the whole
global batch, so it is the same on every rank and in every layout (the trainer sums the loads).

The load-balancing loss (``--moe-router-load-balancing-type``) and the z loss are
``megamoe.model.moe.aux_losses``; their counts come from a plain top-k of the unbiased scores,
not from the (biased, group-limited) choice above, as in Megatron-Core.

The router weight ``[E, H]`` is a dense parameter replicated over TP.  Without sequence
parallelism every TP rank sees the same tokens and must route them identically, so everything
here is computed redundantly on the TP ranks and nothing is communicated (but
``global_aux_loss``'s all-reduce of the counts over DP).  With sequence
parallelism each TP rank routes its own ``T = b * s / TP`` tokens; the aux and z losses stay
those of the whole micro-batch: the expert counts ``f_e`` are summed over TP (no gradient), each
rank computes its tokens' share of the loss (sums divided by the micro-batch's token count) and
``reduce_from_tp_region`` adds the shares in the forward while each rank back-propagates only
its own share, to its own tokens and its (TP-partial) router gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.moe.aux_losses import (
    balancing_choice,
    count_per_expert,
    load_balancing_loss,
    sequence_counts,
    sequence_load_balancing_loss,
    z_loss,
)
from megamoe.model.recompute import is_recomputing
from megamoe.parallel.mappings import all_reduce_tp, reduce_from_tp_region
from megamoe.parallel.params import replicated_bias, tag_param
from megamoe.parallel.state import ParallelState


@dataclass
class Routing:
    """What the router decided for the ``T`` tokens of this rank."""

    expert_ids: torch.Tensor  # [T, K] int64, global expert index of each token-slot
    weights: torch.Tensor  # [T, K] fp32, combine weight of each token-slot
    tokens_per_expert: torch.Tensor  # [E] int64, token-slots routed to each expert (before dropping)
    load_balancing_loss: torch.Tensor  # scalar fp32, un-weighted, of --moe-router-load-balancing-type
    z_loss: torch.Tensor  # scalar fp32, un-weighted


@dataclass(frozen=True)
class RoutingRule:
    """The routing options of ``ModelConfig`` (see the module docstring)."""

    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    renormalize: bool = True  # sigmoid only (--no-moe-router-renormalize)
    scaling_factor: float | None = None
    num_groups: int | None = None
    group_topk: int | None = None

    @classmethod
    def from_config(cls, config: ModelConfig) -> "RoutingRule":
        return cls(
            topk=config.moe_router_topk,
            score_function=config.moe_router_score_function,
            pre_softmax=config.moe_router_pre_softmax,
            renormalize=config.moe_router_renormalize,
            scaling_factor=config.moe_router_topk_scaling_factor,
            num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk,
        )


def _choose(choice_TE: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """``[T, K]`` indices of the K largest choice scores, inside each token's best groups when
    group-limited."""
    if rule.num_groups is None:
        return torch.topk(choice_TE, rule.topk, dim=-1).indices
    num_tokens, num_experts = choice_TE.shape
    per_group = num_experts // rule.num_groups
    grouped_TGP = choice_TE.view(num_tokens, rule.num_groups, per_group)
    group_scores_TG = grouped_TGP.topk(rule.topk // rule.group_topk, dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores_TG, rule.group_topk, dim=-1).indices
    allowed_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    allowed_TE = allowed_TG.repeat_interleave(per_group, dim=1)
    return torch.topk(choice_TE.masked_fill(~allowed_TE, float("-inf")), rule.topk, dim=-1).indices




def route(
    logits_TE: torch.Tensor, rule: RoutingRule, expert_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``rule`` to router logits (any float dtype; computed in it).

    Returns ``(expert_ids_TK, weights_TK, probs_TE)``: ``probs_TE`` are the per-expert
    probabilities of the load-balancing loss (softmax, or the sigmoid scores normalised over E).
    ``expert_bias`` ``[E]`` (sigmoid only) shifts the choice, not the weights.
    """
    if rule.score_function == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        choice_TE = scores_TE if expert_bias is None else scores_TE + expert_bias.to(scores_TE.dtype)
        expert_ids_TK = _choose(choice_TE, rule)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if rule.renormalize and rule.topk > 1:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        assert expert_bias is None, "the expert bias is for sigmoid scores"
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if rule.pre_softmax:
            expert_ids_TK = _choose(probs_TE, rule)
            weights_TK = probs_TE.gather(1, expert_ids_TK)
        else:
            expert_ids_TK = _choose(logits_TE, rule)
            weights_TK = torch.softmax(logits_TE.gather(1, expert_ids_TK), dim=-1)
    if rule.scaling_factor is not None:
        weights_TK = weights_TK * rule.scaling_factor
    return expert_ids_TK, weights_TK, probs_TE


class _RandomLogits(torch.autograd.Function):
    """--moe-router-force-load-balancing: standard-normal logits in the forward (from the default
    RNG stream, the same on the TP ranks), the gradient passed unchanged to the real ones."""

    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(logits_TE)

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor) -> torch.Tensor:
        return grad_TE


def bias_step(tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """The expert-bias change for one step's loads ``[E]``: ``rate * sign(mean - load)`` (fp32).

    Under-loaded experts move up, over-loaded ones down, balanced ones stay.  Only signs
    matter, so loads counted once per TP rank (each TP rank routes the same tokens) give the
    same step as loads counted once.
    """
    loads = tokens_per_expert.double()
    return (rate * torch.sign(loads.mean() - loads)).float()


class TopKRouter(nn.Module):
    def __init__(
        self, config: ModelConfig, num_experts: int, layout: ParallelState, *, dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.num_experts = num_experts
        self.rule = RoutingRule.from_config(config)
        self.balancing_type = config.moe_router_load_balancing_type
        self.jitter_eps = config.moe_input_jitter_eps
        self.force_load_balancing = config.moe_router_force_load_balancing
        self.bias_update_rate = config.expert_bias_update_rate
        expert_bias = None
        if config.moe_router_enable_expert_bias:
            expert_bias = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.register_buffer("expert_bias", expert_bias, persistent=True)
        # global_aux_loss: the step's counts so far, summed over its micro-batches and DP ranks.
        self.register_buffer("step_counts", torch.zeros(num_experts, dtype=torch.float32, device=device),
                             persistent=False)
        self.step_micro_batches = 0
        self.weight = tag_param(
            nn.Parameter(torch.empty(num_experts, config.hidden_size, dtype=dtype, device=device)),
            tensor_parallel_dim=None,
            expert_parallel_size=None,
            init_std=config.init_method_std,
        )
        self.bias = None
        if config.add_bias_linear:
            self.bias = replicated_bias(num_experts, dtype=dtype, device=device)

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

    def forward(self, x_TH: torch.Tensor, num_sequences: int = 1) -> Routing:
        """Route this rank's ``T`` tokens: ``num_sequences`` runs of consecutive tokens, one per
        sequence of the micro-batch (what ``seq_aux_loss`` averages over)."""
        bias = None if self.bias is None else self.bias.float()
        logits_TE = F.linear(self._jitter(x_TH).float(), self.weight.float(), bias)
        if self.force_load_balancing:
            logits_TE = _RandomLogits.apply(logits_TE)
        expert_ids_TK, weights_TK, probs_TE = route(logits_TE, self.rule, self.expert_bias)
        tokens_per_expert = count_per_expert(expert_ids_TK, self.num_experts)
        layout = self.layout
        sp = layout.sequence_parallel
        num_tokens = x_TH.shape[0] * (layout.tp_size if sp else 1)  # the micro-batch's
        balancing = self._balancing_loss(probs_TE, num_sequences, num_tokens)
        z = z_loss(logits_TE, num_tokens)
        if sp:
            tokens_per_expert = all_reduce_tp(tokens_per_expert.clone(), layout)
            balancing, z = reduce_from_tp_region(balancing, layout), reduce_from_tp_region(z, layout)
        return Routing(expert_ids=expert_ids_TK, weights=weights_TK, tokens_per_expert=tokens_per_expert,
                       load_balancing_loss=balancing, z_loss=z)

    def _balancing_loss(self, probs_TE: torch.Tensor, num_sequences: int, num_tokens: int) -> torch.Tensor:
        """This rank's share of the micro-batch's balancing loss (all of it without sequence
        parallelism; under it the TP ranks' shares add up to it)."""
        topk, num_experts, layout = self.rule.topk, self.num_experts, self.layout
        choice_TK = balancing_choice(probs_TE.detach(), topk)
        if self.balancing_type == "seq_aux_loss":
            counts_BE = sequence_counts(choice_TK, num_sequences, num_experts)
            if layout.sequence_parallel:
                counts_BE = all_reduce_tp(counts_BE, layout)
            return sequence_load_balancing_loss(probs_TE, counts_BE, topk, num_tokens // num_sequences)
        counts_E = count_per_expert(choice_TK, num_experts)
        if layout.sequence_parallel:
            counts_E = all_reduce_tp(counts_E, layout)
        if self.balancing_type == "global_aux_loss" and self.training and torch.is_grad_enabled():
            counts_E = self._step_mean_counts(counts_E)
        return load_balancing_loss(probs_TE, counts_E, topk, num_tokens)

    def _step_mean_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """``global_aux_loss``'s counts: the mean over the DP ranks and the step's micro-batches
        so far of each micro-batch's counts (collective over DP, except when recomputing).

        A recomputed forward (--recompute-granularity full) runs in this micro-batch's backward,
        before the next micro-batch: it adds nothing and reads the same mean as the forward did.
        """
        if not is_recomputing():
            counts = counts_E.to(torch.float32)
            if self.layout.dp_size > 1:
                dist.all_reduce(counts, group=self.layout.dp_group)
            self.step_counts += counts
            self.step_micro_batches += 1
        return self.step_counts / (self.step_micro_batches * self.layout.dp_size)

    def start_step(self) -> None:
        """Forget the counts of the previous step (``global_aux_loss``)."""
        self.step_counts.zero_()
        self.step_micro_batches = 0

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """One step of aux-loss-free balancing from the step's global loads ``[E]``."""
        assert self.expert_bias is not None, "--moe-router-enable-expert-bias is off"
        self.expert_bias += bias_step(tokens_per_expert.to(self.expert_bias.device), self.bias_update_rate)
