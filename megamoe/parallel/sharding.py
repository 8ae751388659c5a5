"""How a tensor is cut across the parallel groups: the one sharding rule.

Each rank holds a parameter tagged with ``ParamMeta`` (``megamoe.parallel.params``) as a *local*
tensor: one block of its *global* (full, layout-free) tensor.

* Along ``tensor_parallel_dim``: cut in equal parts over the TP group, or, for an expert
  parameter, over its ETP group; the rank at position ``r`` of that group holds part ``r``.
  With ``unpadded_size`` the dim is padded (the vocabulary, ``layers.padded_vocab_size``): the
  parts together are the *padded* global tensor, the global tensor ends at ``unpadded_size``,
  and the padding holds zeros.
* Along ``EXPERT_DIM`` (expert parameters, stacked ``[local_experts, ...]``): cut over the EP
  group of the layer's EP size; EP rank ``e`` holds global experts ``e * local_experts ...``.
* Nothing else is cut: a dim without a cut, or a tensor without tags (a persistent buffer), is
  replicated.

``splits`` lists one rank's cuts and ``placement`` says where its local tensor sits in the
global one.  Initialisation (``params``), ``gather.gather_full`` and the checkpoint
(``megamoe.checkpointing``: save, load, conversion) all ask here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megamoe.parallel.params import ParamMeta
    from megamoe.parallel.state import ParallelState

EXPERT_DIM = 0


@dataclass(frozen=True)
class Split:
    """One dim of a local tensor cut in ``size`` equal parts, of which this rank holds part ``rank``."""

    dim: int
    size: int
    rank: int
    group: object  # the process group of the ``size`` ranks (None in a layout without groups)


def splits(meta: ParamMeta | None, state: ParallelState) -> tuple[Split, ...]:
    """The cuts of a tensor tagged ``meta`` (None: untagged, replicated) on ``state``'s rank,
    in the order ``gather.gather_full`` undoes them: the tensor-parallel dim, then the experts."""
    if meta is None:
        return ()
    out = []
    groups = state.experts(meta.expert_parallel_size) if meta.is_expert else None
    if meta.tensor_parallel_dim is not None:
        if groups is not None:
            out.append(Split(meta.tensor_parallel_dim, groups.etp_size, groups.etp_rank, groups.etp_group))
        else:
            out.append(Split(meta.tensor_parallel_dim, state.tp_size, state.tp_rank, state.tp_group))
    if groups is not None:
        out.append(Split(EXPERT_DIM, groups.ep_size, groups.ep_rank, groups.ep_group))
    return tuple(out)


@dataclass(frozen=True)
class Placement:
    """A local tensor of ``local_shape`` at ``offsets`` in the padded global tensor of
    ``padded_shape``; the global tensor is its first ``global_shape`` entries."""

    local_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    padded_shape: tuple[int, ...]
    global_shape: tuple[int, ...]

    @property
    def index(self) -> tuple[slice, ...]:
        """The local tensor's index inside the padded global tensor."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.local_shape))


def placement(local_shape, meta: ParamMeta | None, state: ParallelState) -> Placement:
    """Where ``state``'s rank's local tensor of ``local_shape``, tagged ``meta``, sits in its
    global tensor."""
    local = tuple(local_shape)
    padded, offsets = list(local), [0] * len(local)
    for split in splits(meta, state):
        padded[split.dim] = local[split.dim] * split.size
        offsets[split.dim] = split.rank * local[split.dim]
    shape = list(padded)
    if meta is not None and meta.unpadded_size is not None:
        shape[meta.tensor_parallel_dim] = meta.unpadded_size
    return Placement(local, tuple(offsets), tuple(padded), tuple(shape))
