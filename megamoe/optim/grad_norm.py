"""THE global gradient norm (L2 and inf), for clipping, logging and the overflow decision.

The reference note's formula::

    ||g||^2 = sum over dense params (each counted once)
            + sum over EP sizes E (sum over the experts of size E, summed across the EP group)

with TP-sharded parameters summed over TP, TP-replicated ones counted on TP rank 0 only, and
ZeRO-1 shards summed over their shard group.  Whatever the layout, it equals the norm one process
computes for the whole model.

It is computed as "every element of the full model is counted on exactly one rank, then one
collective over the world" (``counts_toward_norm`` is the ownership rule):

* a TP-replicated parameter (norm weights, the router, replicated biases) counts on TP rank 0,
  an ETP-replicated expert bias on ETP rank 0; with sequence parallelism a TP-replicated
  parameter is reduced over DP x TP and counts like any parameter of its group;
* with ZeRO-1 the reduced gradient of each element lives only in its owner's shard, and counts
  there (the shard sum over DP / EDP);
* without ZeRO-1 every rank of the reduction group holds the same reduced gradient, so it counts
  on the group's rank 0 only.  For experts of EP size E those ranks (EDP rank 0) form one EP
  group per TP rank: summing them over the world *is* the sum over the EP group.  It is never an
  average over DP (which would divide the expert part by E: DeepSpeed PR 5259).

At PP > 1 each stage holds other parameters, so the same rule counts each of them once, and the
tied embedding's two copies form one reduction group over the first and the last stage, counted
once like any group.  The parts are named by the layout (``grad_buffer.reduction_names``), so
every rank's table lines up whatever buffers its stage holds.

Each rank's sum of squares and max per part (dense, each EP size) go through one
``all_gather`` over the world; every rank then adds the same table in rank order, so all ranks
get bitwise-identical norms and the same skip decision from that single collective (it is also
the step's only host sync).

The overflow decision cannot read the norm alone: a non-finite value in a gradient this rank
does not count (a TP-replicated parameter's copy on TP rank 1, say) would be applied by its
holder but never seen.  So each rank also checks every gradient it holds (``uncounted``: the
rest of what it will apply) and, optionally, its loss, and the two flags ride in the same table:
one collective, and every rank reads the same ranks as having found one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.optim.grad_buffer import Reduction, replica_rank
from megamoe.parallel.mappings import flat_collective
from megamoe.parallel.params import ParamMeta
from megamoe.parallel.state import ParallelState


@dataclass(frozen=True)
class GradNorm:
    l2: float  # global L2 norm; non-finite when any gradient is
    inf: float  # global max |g|
    parts_l2: dict[str, float]  # L2 norm of each part ("dp": dense, "edp(ep=E)": experts of EP size E)
    nonfinite_grad_ranks: tuple[int, ...] = ()  # ranks holding a non-finite gradient, counted or not
    nonfinite_loss_ranks: tuple[int, ...] = ()  # ranks whose loss (when given) was non-finite

    @property
    def finite(self) -> bool:
        """No rank holds a non-finite gradient (the step may be applied)."""
        return math.isfinite(self.l2) and math.isfinite(self.inf) and not self.nonfinite_grad_ranks


def counts_toward_norm(meta: ParamMeta, reduction: Reduction, *, sharded: bool, state: ParallelState) -> bool:
    """Whether this rank's (shard of the) reduced gradient of a parameter enters the global norm:
    copy 0 of the replicas outside the reduction group (``grad_buffer.replica_rank``), and within
    the group the owner of the shard (ZeRO-1) or its rank 0."""
    if replica_rank(meta, state) != 0:
        return False
    if not sharded and reduction.rank != 0:
        return False
    return True


def _total_norm(tensors: list[torch.Tensor], order: float) -> torch.Tensor:
    """Norm of the concatenation of ``tensors``: per-tensor norms (one multi-tensor kernel per
    device and dtype rather than one launch per tensor), combined in fp64."""
    norms = torch.stack(torch._foreach_norm(tensors, order)).double()
    return torch.linalg.vector_norm(norms, order)


def global_grad_norm(
    parts: dict[str, list[torch.Tensor]],
    world_group: dist.ProcessGroup,
    *,
    device: torch.device,
    uncounted: list[torch.Tensor] = (),
    loss: torch.Tensor | None = None,
) -> GradNorm:
    """Norms of the gradients this rank counts (``counts_toward_norm``), grouped by part, and which
    ranks hold a non-finite gradient or loss.

    ``parts`` must have the same keys in the same order on every rank (a rank may count no
    tensor of a part, or none at all).  ``uncounted``: the other gradients this rank holds (not
    normed, only checked for NaN/inf); ``loss``: this rank's loss of the step (any shape), checked
    the same way.  ``device`` is the model's: the collective's tensors live there on every rank,
    whatever it counts (NCCL refuses CPU tensors, so a rank owning no gradient must not fall back
    to the CPU).  One ``all_gather`` over ``world_group``; returns the same numbers and the same
    ranks on every rank.
    """
    names = list(parts)
    # One row per part (sum of squares, max |g|), then (gradient non-finite, loss non-finite).
    local = torch.zeros(len(names) + 1, 2, dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        if parts[name]:
            local[i, 0] = _total_norm(parts[name], 2.0).square()
            local[i, 1] = _total_norm(parts[name], math.inf)
    bad_grad = ~torch.isfinite(local[: len(names), 1]).all()
    if uncounted:
        bad_grad |= ~torch.isfinite(_total_norm(list(uncounted), math.inf))
    local[-1, 0] = bad_grad.double()
    if loss is not None:
        local[-1, 1] = (~torch.isfinite(loss.detach()).all()).double()
    world = dist.get_world_size(world_group)
    table = torch.empty(world * (len(names) + 1), 2, dtype=torch.float64, device=device)
    flat_collective("all_gather_single", "all_gather_into_tensor")(table, local, group=world_group)
    rows = table.view(world, len(names) + 1, 2).tolist()
    flags = [row.pop() for row in rows]
    parts_sq = {name: math.fsum(row[i][0] for row in rows) for i, name in enumerate(names)}
    inf = max((row[i][1] for row in rows for i in range(len(names))), default=0.0)
    if any(math.isnan(row[i][1]) for row in rows for i in range(len(names))):
        inf = math.nan  # max() would silently skip a NaN that is not first
    l2 = math.sqrt(math.fsum(parts_sq.values()))
    return GradNorm(
        l2=l2,
        inf=inf,
        parts_l2={name: math.sqrt(sq) for name, sq in parts_sq.items()},
        nonfinite_grad_ranks=tuple(r for r, (grad, _) in enumerate(flags) if grad),
        nonfinite_loss_ranks=tuple(r for r, (_, bad_loss) in enumerate(flags) if bad_loss),
    )
