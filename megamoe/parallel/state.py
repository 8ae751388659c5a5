"""Process groups for tensor (TP), data (DP), expert (EP), expert-tensor (ETP) and expert-data
(EDP) parallelism: the one place where groups are formed.

Rank layout (documented contract; the tests check it)::

    dense layers   global_rank = dp_rank * TP + tp_rank                 (TP fastest, then DP)
    experts        global_rank = (edp_rank * EP + ep_rank) * ETP + etp_rank   (for each EP size)

    TP group      : the TP consecutive ranks   {dp_rank * TP + t  for t in range(TP)}
    DP group      : the ranks with one tp_rank {d * TP + tp_rank  for d in range(DP)}
    ETP group     : the ETP consecutive ranks  {r - etp_rank + e  for e in range(ETP)}
    EP group(ep)  : ep ranks of one block of ep * ETP consecutive ranks, with the same etp_rank
    EDP group(ep) : the world / (ep * ETP) ranks with the same (ep_rank, etp_rank): the same
                    expert shards

The experts' layout is folded over the world independently of the dense one ("MoE parallel
folding"): ETP (``--expert-tensor-parallel-size``, default TP) shards every expert, and EP x ETP
may span TP and DP.  With ETP = TP the expert groups are the classic ones: every EP group is made
of ranks with one TP rank (EP consecutive ranks of a DP group) and experts are tensor-parallel
over the TP group.  With ETP = 1 and EP = TP x DP every rank holds whole experts of its own.

``sequence_parallel`` (``--sequence-parallel``, needs TP > 1) is part of the layout: outside the
TP GEMMs each TP rank holds ``1/TP`` of the sequence.  ETP different from TP needs it, because
only then does each rank route tokens of its own.

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
    *,
    world_size: int,
    tensor_model_parallel_size: int,
    expert_model_parallel_sizes: Iterable[int],
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
) -> None:
    """Raise ``ValueError`` (naming the flags and the valid values) if the sizes cannot form a
    layout.  ``expert_tensor_parallel_size`` None means TP."""
    tp = tensor_model_parallel_size
    if tp < 1 or world_size % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide the world size {world_size}; "
            f"valid values: {_divisors(world_size)}"
        )
    if sequence_parallel and tp == 1:
        raise ValueError(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (got 1); "
            f"valid --tensor-model-parallel-size values with it: {_divisors(world_size)[1:]}"
        )
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    if etp < 1 or world_size % etp != 0:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} does not divide the world size {world_size}; "
            f"valid values: {_divisors(world_size)}"
        )
    if etp != tp and not sequence_parallel:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size {tp}: "
            f"that needs --sequence-parallel (each TP rank then routes its own tokens); "
            f"valid without it: {tp}"
        )
    dp = world_size // tp
    for ep in expert_model_parallel_sizes:
        if etp == tp and (ep < 1 or dp % ep != 0):
            raise ValueError(
                f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                f"(world {world_size} / tensor-parallel {tp}); valid values: {_divisors(dp)}"
            )
        if ep < 1 or (world_size // etp) % ep != 0:
            raise ValueError(
                f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not divide "
                f"the world size {world_size}; valid --expert-model-parallel-size values: "
                f"{_divisors(world_size // etp)}"
            )


@dataclass
class ExpertGroups:
    """The ETP, EP and EDP groups of one expert-parallel size, as seen from this rank."""

    etp_size: int
    etp_group: dist.ProcessGroup
    etp_rank: int
    etp_ranks: list[int]
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
    etp_size: int
    sequence_parallel: bool = False
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


def etp_rank_lists(world_size: int, etp: int) -> list[list[int]]:
    return [list(range(start, start + etp)) for start in range(0, world_size, etp)]


def ep_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [
        [start + e * etp + t for e in range(ep)] for start in range(0, world_size, block) for t in range(etp)
    ]


def edp_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [list(range(offset, world_size, block)) for offset in range(block)]


def _expert_groups(
    world_size: int, rank: int, etp_group, etp_ranks: list[int], ep: int, create: bool
) -> ExpertGroups:
    etp = len(etp_ranks)
    ep_group, ep_ranks = _new_groups(ep_rank_lists(world_size, etp, ep), rank, create)
    edp_group, edp_ranks = _new_groups(edp_rank_lists(world_size, etp, ep), rank, create)
    return ExpertGroups(
        etp_size=etp,
        etp_group=etp_group,
        etp_rank=etp_ranks.index(rank),
        etp_ranks=etp_ranks,
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
    *,
    world_size: int,
    rank: int,
    tensor_model_parallel_size: int,
    expert_model_parallel_sizes: Iterable[int],
    create_groups: bool,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
) -> ParallelState:
    """The layout of ``rank``: its ranks and coordinates in every group.

    ``create_groups=True`` (what ``initialize_model_parallel`` does) creates the process groups,
    a collective over the world; ``False`` leaves every group None, for planning a layout that no
    process runs (checkpoint conversion).  EP size 1 is always included.
    ``expert_tensor_parallel_size`` None means TP.  Validated before any group is created.
    """
    tp = tensor_model_parallel_size
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    ep_sizes = sorted(set(expert_model_parallel_sizes) | {1})
    validate_parallel_sizes(
        world_size=world_size,
        tensor_model_parallel_size=tp,
        expert_model_parallel_sizes=ep_sizes,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
    )
    tp_group, tp_ranks = _new_groups(tp_rank_lists(world_size, tp), rank, create_groups)
    dp_group, dp_ranks = _new_groups(dp_rank_lists(world_size, tp), rank, create_groups)
    if etp == tp:  # the same ranks: reuse the TP groups rather than create them twice
        etp_group, etp_ranks = tp_group, tp_ranks
    else:
        etp_group, etp_ranks = _new_groups(etp_rank_lists(world_size, etp), rank, create_groups)
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
        etp_size=etp,
        sequence_parallel=sequence_parallel,
    )
    for ep in ep_sizes:
        state.expert[ep] = _expert_groups(world_size, rank, etp_group, etp_ranks, ep, create_groups)
    return state


def single_rank_layout() -> ParallelState:
    """The layout of a one-process run (TP = DP = EP = 1), without process groups: every
    collective of a model built for it is skipped, so it runs without ``torch.distributed``."""
    return build_parallel_state(
        world_size=1, rank=0, tensor_model_parallel_size=1, expert_model_parallel_sizes=(1,), create_groups=False
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_sizes: Iterable[int] = (1,),
    *,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
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
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        sequence_parallel=sequence_parallel,
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
