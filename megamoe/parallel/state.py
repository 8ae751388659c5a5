"""Process groups for tensor (TP), data (DP), expert (EP) and expert-data (EDP) parallelism.

Rank layout (documented contract; the tests check it)::

    global_rank = dp_rank * TP + tp_rank          # TP fastest-varying, then DP

    TP group      : the TP consecutive ranks   {dp_rank * TP + t  for t in range(TP)}
    DP group      : the ranks with one tp_rank {d * TP + tp_rank  for d in range(DP)}
    model-parallel: the TP group (there is no pipeline parallelism)
    EP group(ep)  : ep consecutive DP ranks of one DP group; dp_rank = edp_rank * ep + ep_rank
    EDP group(ep) : the DP/ep ranks of one DP group with the same ep_rank (same experts)

So every EP group is made of ranks with the same TP rank, and experts are tensor-parallel over
the same TP group as the dense layers.  A future expert-TP size of 1 ("parallel folding") only
has to change ``_expert_groups`` below: everything else asks for groups through this object.

A ``ParallelState`` is the layout of one rank: its coordinates and, when built with
``create_groups=True``, its process groups.  Models, their layers and the optimizer receive it
explicitly and use its groups at run time, so a model can be built for any layout in one
process without ``torch.distributed`` (``build_parallel_state(..., create_groups=False)``):
to list its parameter shapes, plan a conversion or check a formula.  The training process
keeps the one it runs in: ``initialize_model_parallel`` builds it after ``torch.distributed``
is up, ``get_parallel_state`` returns it, ``destroy_model_parallel`` drops it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_parallel_sizes(
    *, world_size: int, tensor_model_parallel_size: int, expert_model_parallel_sizes: Iterable[int]
) -> None:
    """Raise ``ValueError`` (naming the flag and the valid values) if the sizes cannot form a layout."""
    tp = tensor_model_parallel_size
    if tp < 1 or world_size % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide the world size {world_size}; "
            f"valid values: {_divisors(world_size)}"
        )
    dp = world_size // tp
    for ep in expert_model_parallel_sizes:
        if ep < 1 or dp % ep != 0:
            raise ValueError(
                f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                f"(world {world_size} / tensor-parallel {tp}); valid values: {_divisors(dp)}"
            )


@dataclass
class ExpertGroups:
    """The EP and EDP groups of one expert-parallel size, as seen from this rank."""

    ep_size: int
    ep_group: dist.ProcessGroup
    ep_rank: int
    ep_ranks: list[int]
    edp_group: dist.ProcessGroup
    edp_rank: int
    edp_size: int
    edp_ranks: list[int]


@dataclass
class ParallelState:
    """The layout of one rank: its coordinates and ranks in every group, and the process groups
    themselves (None when built with ``create_groups=False``).  Built by ``build_parallel_state``."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: dist.ProcessGroup
    tp_ranks: list[int]
    dp_size: int
    dp_rank: int
    dp_group: dist.ProcessGroup
    dp_ranks: list[int]
    world_group: dist.ProcessGroup
    expert: dict[int, ExpertGroups] = field(default_factory=dict)

    def experts(self, ep_size: int) -> ExpertGroups:
        """EP/EDP groups for ``ep_size``; it must have been passed to ``initialize_model_parallel``."""
        try:
            return self.expert[ep_size]
        except KeyError:
            raise ValueError(
                f"expert-parallel size {ep_size} was not initialised; "
                f"initialize_model_parallel got {sorted(self.expert)}"
            ) from None


_STATE: ParallelState | None = None


def _new_groups(rank_lists: list[list[int]], my_rank: int, create: bool) -> tuple[dist.ProcessGroup | None, list[int]]:
    """This rank's group of ``rank_lists``.  With ``create``, every group is created (all ranks
    must call ``new_group`` for each, in the same order); without it the group is None."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks) if create else None
        if my_rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {my_rank} is in none of {rank_lists}"
    return mine


def tp_rank_lists(world_size: int, tp: int) -> list[list[int]]:
    return [list(range(start, start + tp)) for start in range(0, world_size, tp)]


def dp_rank_lists(world_size: int, tp: int) -> list[list[int]]:
    return [list(range(t, world_size, tp)) for t in range(tp)]


def ep_rank_lists(world_size: int, tp: int, ep: int) -> list[list[int]]:
    lists = []
    for dp_ranks in dp_rank_lists(world_size, tp):
        for start in range(0, len(dp_ranks), ep):
            lists.append(dp_ranks[start : start + ep])
    return lists


def edp_rank_lists(world_size: int, tp: int, ep: int) -> list[list[int]]:
    lists = []
    for dp_ranks in dp_rank_lists(world_size, tp):
        for e in range(ep):
            lists.append(dp_ranks[e::ep])
    return lists


def _expert_groups(world_size: int, rank: int, tp: int, ep: int, create: bool) -> ExpertGroups:
    ep_group, ep_ranks = _new_groups(ep_rank_lists(world_size, tp, ep), rank, create)
    edp_group, edp_ranks = _new_groups(edp_rank_lists(world_size, tp, ep), rank, create)
    return ExpertGroups(
        ep_size=ep,
        ep_group=ep_group,
        ep_rank=ep_ranks.index(rank),
        ep_ranks=ep_ranks,
        edp_group=edp_group,
        edp_rank=edp_ranks.index(rank),
        edp_size=len(edp_ranks),
        edp_ranks=edp_ranks,
    )


def build_parallel_state(
    *, world_size: int, rank: int, tensor_model_parallel_size: int, expert_model_parallel_sizes: Iterable[int],
    create_groups: bool,
) -> ParallelState:
    """The layout of ``rank``: its ranks and coordinates in every group.

    ``create_groups=True`` (what ``initialize_model_parallel`` does) creates the process groups,
    a collective over the world; ``False`` leaves every group None, for planning a layout that no
    process runs (checkpoint conversion).  EP size 1 is always included.
    """
    tp = tensor_model_parallel_size
    ep_sizes = sorted(set(expert_model_parallel_sizes) | {1})
    validate_parallel_sizes(
        world_size=world_size, tensor_model_parallel_size=tp, expert_model_parallel_sizes=ep_sizes
    )
    tp_group, tp_ranks = _new_groups(tp_rank_lists(world_size, tp), rank, create_groups)
    dp_group, dp_ranks = _new_groups(dp_rank_lists(world_size, tp), rank, create_groups)
    state = ParallelState(
        world_size=world_size,
        rank=rank,
        tp_size=tp,
        tp_rank=tp_ranks.index(rank),
        tp_group=tp_group,
        tp_ranks=tp_ranks,
        dp_size=world_size // tp,
        dp_rank=dp_ranks.index(rank),
        dp_group=dp_group,
        dp_ranks=dp_ranks,
        world_group=dist.group.WORLD if create_groups else None,
    )
    for ep in ep_sizes:
        state.expert[ep] = _expert_groups(world_size, rank, tp, ep, create_groups)
    return state


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, expert_model_parallel_sizes: Iterable[int] = (1,)
) -> ParallelState:
    """Build every group of the layout; call on all ranks after ``dist.init_process_group``.

    ``expert_model_parallel_sizes`` lists each distinct EP size used by the model's MoE layers
    (e.g. ``(4, 2)`` for a model with layers at EP=4 and EP=2).  EP size 1 is always available.
    Sizes are validated before any group is created.
    """
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_model_parallel")
    if _STATE is not None:
        raise RuntimeError("model parallel state is already initialised; call destroy_model_parallel first")
    _STATE = build_parallel_state(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_model_parallel_size=tensor_model_parallel_size,
        expert_model_parallel_sizes=expert_model_parallel_sizes,
        create_groups=True,
    )
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("initialize_model_parallel has not been called")
    return _STATE


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays up)."""
    global _STATE
    _STATE = None


def default_backend(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(requested: str | None) -> str:
    """--device (``"cpu"`` or ``"cuda"``, checked by TrainConfig); unset means CUDA when
    available.  Raises ``ValueError`` for CUDA without CUDA."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")
    return requested


def device_from_environment(requested: str | None = None) -> torch.device:
    """Pick the device for this process: CUDA device LOCAL_RANK when CUDA is used, else CPU."""
    if resolve_device(requested) == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
