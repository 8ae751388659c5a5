"""Process groups for pipeline (PP), tensor (TP), data (DP), expert (EP), expert-tensor (ETP)
and expert-data (EDP) parallelism: the one place where groups are formed.  Which ranks form each
group is the rank layout documented in ``megamoe.parallel.rank_lists``; what a layout must
satisfy, and what is derived from it, is ``megamoe.parallel.layout_rules``'s.

A ``ParallelState`` is the layout of one rank: its coordinates, the EP size of each MoE layer,
its RNG streams and, when built with ``create_groups=True``, its process groups.  It is built
here only (``build_parallel_state`` from a ``ParallelConfig``, the model's experts and the world,
checked by ``layout_rules.validate_parallel_layout``), and nothing in megamoe keeps it in module
state: the entry point builds it (``initialize_model_parallel``) and passes it to the model, its
layers, the optimizer, the trainer and the checkpoint code, which use its groups at run time.  A
model can so be built for any layout in one process without ``torch.distributed``
(``create_groups=False``): to list its parameter shapes, plan a conversion or check a formula.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout_rules import (ep_misfit, pipeline_chunks, resolved_expert_tensor_parallel_size,
                                           validate_parallel_layout)
from megamoe.parallel.random import RNGStatesTracker
from megamoe.parallel.rank_lists import (consecutive_rank_lists, dp_rank_lists, edp_rank_lists, embedding_dp_rank_lists,
                                        embedding_rank_lists, ep_rank_lists, in_every_stage, pp_rank_lists)


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
    """The layout of one rank: its coordinates and ranks in every group, the process groups
    themselves (None when built with ``create_groups=False``), the EP size of each MoE layer,
    and the rank's RNG streams (``rng``, seeded by ``megamoe.parallel.random.model_parallel_seed``).
    Built, validated, by ``build_parallel_state``; everything below the entry point receives it."""

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
    ep_by_layer: dict[int, int] = field(default_factory=dict)
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker)
    # Pipeline (PP 1: one stage, the whole world; no PP or embedding group).
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    pp_ranks: list[int] = field(default_factory=list)
    stage_group: dist.ProcessGroup | None = None  # the ranks of this stage (the world at PP 1)
    stage_ranks: list[int] = field(default_factory=list)
    embedding_ranks: list[int] = field(default_factory=list)  # first and last stage's rank of this stage_rank
    embedding_dp_group: dist.ProcessGroup | None = None  # first and last stage's DP groups of this tp_rank (PP > 1)
    embedding_dp_ranks: list[int] = field(default_factory=list)
    # This rank's model chunks: global layer ranges, one per virtual stage (None: all layers, PP 1
    # without --num-layers given to the layout).
    model_chunks: tuple[range, ...] | None = None

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: world / PP."""
        return self.world_size // self.pp_size

    @property
    def stage_rank(self) -> int:
        """This rank's index within its stage."""
        return self.rank % self.stage_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def virtual_size(self) -> int:
        """V: model chunks per pipeline rank (the interleaved schedule's virtual stages)."""
        return len(self.model_chunks) if self.model_chunks is not None else 1

    def layers(self, num_layers: int) -> list[int]:
        """The global indices of the layers this rank holds, in order, for a model of ``num_layers``."""
        if self.model_chunks is None:
            if self.pp_size > 1:
                raise ValueError("a pipeline layout needs the model's layers: build it with "
                                 "ParallelConfig.pipeline_num_layers")
            return list(range(num_layers))
        held = [i for chunk in self.model_chunks for i in chunk]
        end = max(chunk.stop for chunk in self.model_chunks)
        if self.is_last_stage and end != num_layers:
            raise ValueError(f"the layout was built for --num-layers {end} but the model has {num_layers}")
        return held

    def experts(self, ep_size: int) -> ExpertGroups:
        """EP/EDP groups for ``ep_size``; it must be one of the layout's EP sizes."""
        try:
            return self.expert[ep_size]
        except KeyError:
            raise ValueError(
                f"expert-parallel size {ep_size} is not part of this layout; its EP sizes are {sorted(self.expert)}"
            ) from None

    def ep_size_of_layer(self, layer: int) -> int:
        """The EP size of MoE layer ``layer`` (its global index)."""
        try:
            return self.ep_by_layer[layer]
        except KeyError:
            raise ValueError(
                f"layer {layer} is not an MoE layer of this layout (MoE layers: {sorted(self.ep_by_layer)}); build "
                f"the layout with the model's experts_by_layer()"
            ) from None

    @property
    def moe_ep_sizes(self) -> tuple[int, ...]:
        """The EP size of every MoE layer, in layer order."""
        return tuple(self.ep_by_layer[layer] for layer in sorted(self.ep_by_layer))

    def describe(self) -> str:
        """One line: the sizes of every dimension."""
        eps = list(self.moe_ep_sizes) or "-"
        virtual = f" x V {self.virtual_size}" if self.virtual_size > 1 else ""
        pp = f"PP {self.pp_size}{virtual} x " if self.pp_size > 1 else ""
        return (f"world {self.world_size} ({pp}TP {self.tp_size} x DP {self.dp_size}"
                f"{', sequence parallel' if self.sequence_parallel else ''}), ETP {self.etp_size}, "
                f"EP per MoE layer {eps}")


def _new_groups(rank_lists: list[list[int]], my_rank: int, create: bool,
                member: bool = True) -> tuple[dist.ProcessGroup | None, list[int]]:
    """This rank's group of ``rank_lists``.  With ``create``, every group is created (all ranks
    must call ``new_group`` for each, in the same order); without it the group is None.  With
    ``member`` False the rank may be in none of them: then ``(None, [])``."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks) if create else None
        if my_rank in ranks:
            mine = (group, ranks)
    assert mine is not None or not member, f"rank {my_rank} is in none of {rank_lists}"
    return mine or (None, [])


def _expert_groups(
    world_size: int, pp: int, rank: int, etp_group, etp_ranks: list[int], ep: int, create: bool
) -> ExpertGroups:
    etp = len(etp_ranks)
    stage = world_size // pp
    ep_group, ep_ranks = _new_groups(in_every_stage(ep_rank_lists(stage, etp, ep), stage, pp), rank, create)
    edp_group, edp_ranks = _new_groups(in_every_stage(edp_rank_lists(stage, etp, ep), stage, pp), rank, create)
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
    config: ParallelConfig,
    *,
    rank: int,
    create_groups: bool,
    experts_by_layer: Mapping[int, int] | None = None,
) -> ParallelState:
    """The layout of ``rank`` in ``config``'s world: its ranks and coordinates in every group.

    ``experts_by_layer`` (``ModelConfig.experts_by_layer()``: ``{MoE layer: experts}``) gives
    each MoE layer its EP size and is checked against it; None builds the groups of the listed
    EP sizes only (a layout for tests of single layers).  EP size 1 is always included.
    ``create_groups=True`` (``initialize_model_parallel``) creates the process groups, a
    collective over the world; ``False`` leaves every group None, for planning a layout that no
    process runs (checkpoint conversion).  Validated (``validate_parallel_layout``) before any
    group is created.
    """
    ep_by_layer = validate_parallel_layout(config, experts_by_layer)
    world_size, tp, pp = config.world_size, config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    stage = config.stage_world_size
    etp = resolved_expert_tensor_parallel_size(config)
    fitting = {ep for ep in config.expert_model_parallel_size if ep_misfit(config, ep) is None}
    ep_sizes = sorted(fitting | set(ep_by_layer.values()) | {1})
    tp_group, tp_ranks = _new_groups(in_every_stage(consecutive_rank_lists(stage, tp), stage, pp), rank, create_groups)
    dp_group, dp_ranks = _new_groups(in_every_stage(dp_rank_lists(stage, tp), stage, pp), rank, create_groups)
    if etp == tp:  # the same ranks: reuse the TP groups rather than create them twice
        etp_group, etp_ranks = tp_group, tp_ranks
    else:
        etp_group, etp_ranks = _new_groups(in_every_stage(consecutive_rank_lists(stage, etp), stage, pp), rank,
                                           create_groups)
    world_group = dist.group.WORLD if create_groups else None
    pipeline = dict(pp_ranks=[rank], stage_group=world_group, stage_ranks=list(range(world_size)),
                    embedding_ranks=[rank], embedding_dp_ranks=dp_ranks)
    if pp > 1:
        pp_group, pp_ranks = _new_groups(pp_rank_lists(world_size, pp), rank, create_groups)
        stage_group, stage_ranks = _new_groups(consecutive_rank_lists(world_size, stage), rank, create_groups)
        pipeline = dict(pp_group=pp_group, pp_ranks=pp_ranks, stage_group=stage_group, stage_ranks=stage_ranks)
        # Only the first and last stage's ranks are in an embedding group (the others get none).  Its
        # ranks only: no collective runs over it (the tied weight is reduced over embedding_dp_group).
        _, pipeline["embedding_ranks"] = _new_groups(embedding_rank_lists(world_size, pp), rank, False, member=False)
        pipeline["embedding_dp_group"], pipeline["embedding_dp_ranks"] = _new_groups(
            embedding_dp_rank_lists(world_size, pp, tp), rank, create_groups, member=False)
    chunks = pipeline_chunks(config)
    state = ParallelState(
        world_size=world_size,
        rank=rank,
        tp_size=tp,
        tp_rank=tp_ranks.index(rank),
        tp_group=tp_group,
        tp_ranks=tp_ranks,
        dp_size=len(dp_ranks),
        dp_rank=dp_ranks.index(rank),
        dp_group=dp_group,
        dp_ranks=dp_ranks,
        world_group=world_group,
        etp_size=etp,
        sequence_parallel=config.sequence_parallel,
        ep_by_layer=ep_by_layer,
        pp_size=pp,
        pp_rank=rank // stage,
        model_chunks=chunks[rank // stage] if chunks is not None else None,
        **pipeline,
    )
    for ep in ep_sizes:
        state.expert[ep] = _expert_groups(world_size, pp, rank, etp_group, etp_ranks, ep, create_groups)
    return state


def single_rank_layout(experts_by_layer: Mapping[int, int] | None = None) -> ParallelState:
    """The layout of a one-process run (TP = DP = EP = 1), without process groups: every
    collective of a model built for it is skipped, so it runs without ``torch.distributed``."""
    return build_parallel_state(ParallelConfig(), rank=0, create_groups=False, experts_by_layer=experts_by_layer)


def initialize_model_parallel(
    config: ParallelConfig, experts_by_layer: Mapping[int, int] | None = None
) -> ParallelState:
    """Build every group of ``config``'s layout over the running world (``config.world_size`` is
    taken from ``torch.distributed``) and return this rank's ``ParallelState``; call on all
    ranks after ``dist.init_process_group``.  Nothing is kept in module state: the caller passes
    the result on.  See ``build_parallel_state`` for ``experts_by_layer``."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_model_parallel")
    config = dataclasses.replace(config, world_size=dist.get_world_size())
    return build_parallel_state(config, rank=dist.get_rank(), create_groups=True, experts_by_layer=experts_by_layer)


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
