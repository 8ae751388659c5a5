"""Process groups for pipeline (PP), tensor (TP), data (DP), expert (EP), expert-tensor (ETP)
and expert-data (EDP) parallelism: the one place where groups are formed.

Rank layout (documented contract; the tests check it).  PP is outermost: the world is P pipeline
stages of S = world / P consecutive ranks, and every other group is formed inside one stage by
the formulas below applied to the rank within the stage::

    pipeline       global_rank = pp_rank * S + stage_rank                       (PP slowest)
    dense layers   stage_rank  = dp_rank * TP + tp_rank                 (TP fastest, then DP)
    experts        stage_rank  = (edp_rank * EP + ep_rank) * ETP + etp_rank   (for each EP size)

    PP group      : the P ranks with one stage_rank {p * S + stage_rank  for p in range(P)}
    stage group   : the S ranks of one stage (what "the world" is for the groups below)
    embedding group: the first and the last stage's rank with one stage_rank (the tied input
                    embedding and output layer); its DP version, the first and last stage's DP
                    groups of one tp_rank, reduces the tied weight's gradient

    (within one stage, ranks counted from the stage's first)
    TP group      : the TP consecutive ranks   {dp_rank * TP + t  for t in range(TP)}
    DP group      : the ranks with one tp_rank {d * TP + tp_rank  for d in range(DP)}
    ETP group     : the ETP consecutive ranks  {r - etp_rank + e  for e in range(ETP)}
    EP group(ep)  : ep ranks of one block of ep * ETP consecutive ranks, with the same etp_rank
    EDP group(ep) : the S / (ep * ETP) ranks with the same (ep_rank, etp_rank): the same
                    expert shards

Each stage holds consecutive layers (``megamoe.parallel.pipeline.stages``: the pure function that
splits them, also into the interleaved schedule's virtual chunks); a MoE layer keeps its global
index and its EP size, and every stage forms the groups of every EP size of the model.

The experts' layout is folded over the world independently of the dense one ("MoE parallel
folding"): ETP (``--expert-tensor-parallel-size``, default TP) shards every expert, and EP x ETP
may span TP and DP.  With ETP = TP the expert groups are the classic ones: every EP group is made
of ranks with one TP rank (EP consecutive ranks of a DP group) and experts are tensor-parallel
over the TP group.  With ETP = 1 and EP = TP x DP every rank holds whole experts of its own.

``sequence_parallel`` (``--sequence-parallel``, needs TP > 1) is part of the layout: outside the
TP GEMMs each TP rank holds ``1/TP`` of the sequence.  ETP different from TP needs it, because
only then does each rank route tokens of its own.

A ``ParallelState`` is the layout of one rank: its coordinates, the EP size of each MoE layer,
its RNG streams and, when built with ``create_groups=True``, its process groups.  It is derived
and validated here only (``build_parallel_state`` from a ``ParallelConfig``, the model's experts
and the world), and nothing in megamoe keeps it in module state: the entry point builds it
(``initialize_model_parallel``) and passes it to the model, its layers, the optimizer, the
trainer and the checkpoint code, which use its groups at run time.  A model can so be built for
any layout in one process without ``torch.distributed`` (``create_groups=False``): to list its
parameter shapes, plan a conversion or check a formula.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.pipeline.stages import stage_layer_counts, stage_layer_ranges, virtual_stage_count
from megamoe.parallel.random import RNGStatesTracker


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolved_expert_tensor_parallel_size(config: ParallelConfig) -> int:
    """ETP: ``--expert-tensor-parallel-size``, or TP when it is not given."""
    etp = config.expert_tensor_parallel_size
    return config.tensor_model_parallel_size if etp is None else etp


def _stage_words(config: ParallelConfig) -> str:
    """How messages name the ranks the TP, DP and expert groups split: the world, or one stage's."""
    world, pp = config.world_size, config.pipeline_model_parallel_size
    if pp == 1:
        return f"the world size {world}"
    return f"a pipeline stage's {config.stage_world_size} ranks (world {world} / --pipeline-model-parallel-size {pp})"


def pipeline_chunks(config: ParallelConfig) -> list[tuple[range, ...]] | None:
    """Per pipeline rank, its model chunks' global layer ranges (``stages.stage_layer_ranges``)
    for ``config.pipeline_num_layers``; None when the layers are not given.  Raises the layout's
    one-line ``ValueError`` when they cannot be split so."""
    pp = config.pipeline_model_parallel_size
    if config.pipeline_num_layers is None:
        virtual = config.virtual_pipeline_model_parallel_size or 1
        if (virtual > 1 or config.num_layers_per_virtual_pipeline_stage is not None) and pp == 1:
            raise ValueError("the interleaved schedule (virtual pipeline stages) needs "
                             "--pipeline-model-parallel-size > 1")
        return None
    counts = stage_layer_counts(config.pipeline_num_layers, pp, config.decoder_first_pipeline_num_layers,
                                config.decoder_last_pipeline_num_layers)
    virtual = virtual_stage_count(counts, config.virtual_pipeline_model_parallel_size,
                                  config.num_layers_per_virtual_pipeline_stage)
    return stage_layer_ranges(config.pipeline_num_layers, pp, virtual, config.decoder_first_pipeline_num_layers,
                              config.decoder_last_pipeline_num_layers)


def _check_pipeline(config: ParallelConfig) -> None:
    """PP divides the world; the layers split over the stages and virtual chunks; the schedule
    takes the micro-batch count (1F1B: at least P; interleaved: a multiple of P, Megatron's rule)."""
    world, pp = config.world_size, config.pipeline_model_parallel_size
    if pp < 1 or world % pp != 0:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} does not divide the world size {world}; "
            f"valid values: {_divisors(world)}"
        )
    chunks = pipeline_chunks(config)
    m = config.pipeline_num_microbatches
    if pp == 1 or m is None:
        return
    virtual = len(chunks[0]) if chunks is not None else (config.virtual_pipeline_model_parallel_size or 1)
    if virtual == 1 and m < pp:
        raise ValueError(
            f"the 1F1B schedule needs at least --pipeline-model-parallel-size {pp} micro-batches per step, got {m} "
            f"(--global-batch-size / (--micro-batch-size x data-parallel size)); raise --global-batch-size"
        )
    if virtual > 1 and m % pp != 0:
        raise ValueError(
            f"the interleaved schedule needs the micro-batches per step ({m}: --global-batch-size / "
            f"(--micro-batch-size x data-parallel size)) to be a multiple of --pipeline-model-parallel-size {pp}"
        )


def validate_parallel_layout(config: ParallelConfig, experts_by_layer: Mapping[int, int] | None = None) -> dict[int, int]:
    """The one check of a layout: raise ``ValueError`` (one line, naming the flags and the valid
    values) if ``config`` cannot be laid out over its world, or cannot split the experts of
    ``experts_by_layer`` (``{MoE layer index: experts}``; ``{}`` for a dense model; None when no
    model is given, then only the listed EP sizes are checked).  Returns the EP size of each MoE
    layer of ``experts_by_layer``.

    With ``config.elastic`` (``--elastic``: the world may change size under torchrun ``--nnodes
    MIN:MAX``) an EP size that does not fit is not refused: the layer gets ``elastic_ep_size``, the
    largest EP size not above the configured one that fits a stage of this world (world / PP) and
    its experts.  PP, TP and ETP are never changed: a PP that no longer divides the world, or a TP
    or ETP that no longer divides a stage's ranks, is refused as always; DP follows the world.

    With ``--pipeline-model-parallel-size`` P every size is checked against one stage's world /
    P ranks, and, when ``config.pipeline_num_layers`` / ``pipeline_num_microbatches`` are set, the layers' split over
    the stages and virtual chunks and the schedule's micro-batch count (``_check_pipeline``)."""
    _check_pipeline(config)
    world, tp = config.stage_world_size, config.tensor_model_parallel_size
    where = _stage_words(config)
    if tp < 1 or world % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide {where}; valid values: {_divisors(world)}"
        )
    if config.sequence_parallel and tp == 1:
        raise ValueError(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (got 1); "
            f"valid --tensor-model-parallel-size values with it: {_divisors(world)[1:]}"
        )
    etp = resolved_expert_tensor_parallel_size(config)
    if etp < 1 or world % etp != 0:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} does not divide {where}; valid values: {_divisors(world)}"
        )
    if etp != tp and not config.sequence_parallel:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size {tp}: "
            f"that needs --sequence-parallel (each TP rank then routes its own tokens); valid without it: {tp}"
        )
    if experts_by_layer is None:
        for ep in config.expert_model_parallel_size:
            misfit = _ep_misfit(config, ep)
            if misfit is not None and not config.elastic:
                raise ValueError(misfit)
        return {}
    ep_by_layer = _ep_by_layer(config.expert_model_parallel_size, experts_by_layer)
    for layer, ep in ep_by_layer.items():
        misfit = _ep_misfit(config, ep, experts_by_layer[layer], layer)
        if misfit is not None:
            if not config.elastic:
                raise ValueError(misfit)
            ep_by_layer[layer] = elastic_ep_size(config, ep, experts_by_layer[layer])
    return ep_by_layer


def _ep_misfit(config: ParallelConfig, ep: int, experts: int | None = None, layer: int | None = None) -> str | None:
    """Why EP size ``ep`` cannot split ``experts`` (layer ``layer``; None: any count) over
    ``config``'s world, in one line naming the flags and the valid values; None when it can.
    The rules: EP divides the experts; EP x ETP divides the world; with ETP = TP, EP divides DP
    (an EP group is then made of ranks with one TP rank)."""
    world, tp, dp = config.stage_world_size, config.tensor_model_parallel_size, config.data_parallel_size
    etp = resolved_expert_tensor_parallel_size(config)
    if ep < 1 or (experts is not None and experts % ep != 0):
        return (f"--num-experts {experts} (layer {layer}) is not divisible by --expert-model-parallel-size {ep}; "
                f"valid expert-parallel sizes: {_divisors(experts or 1)}")
    if etp == tp and dp % ep != 0:
        return (f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                f"({_stage_words(config)} / tensor-parallel {tp}); valid values: {_divisors(dp)}")
    if (world // etp) % ep != 0:
        return (f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not divide "
                f"{_stage_words(config)}; valid --expert-model-parallel-size values: {_divisors(world // etp)}")
    return None


def elastic_ep_size(config: ParallelConfig, ep: int, experts: int) -> int:
    """The EP size an ``--elastic`` run gives a MoE layer of ``experts`` configured with EP ``ep``:
    the largest size not above ``ep`` that fits one pipeline stage of ``config``'s world (world /
    PP ranks; see ``_ep_misfit``); 1 always fits."""
    return max(e for e in range(1, ep + 1) if _ep_misfit(config, e, experts) is None)


def elastic_layout_line(config: ParallelConfig, state: ParallelState) -> str | None:
    """One line for the log of an ``--elastic`` run: the layout chosen for this world and, when an
    EP size fell back, the configured one.  None without ``--elastic``."""
    if not config.elastic:
        return None
    configured = list(config.expert_model_parallel_size)
    fell_back = _ep_by_layer(config.expert_model_parallel_size, state.ep_by_layer) != state.ep_by_layer
    pp = f"PP {state.pp_size}, " if state.pp_size > 1 else ""
    world = "a stage's ranks" if state.pp_size > 1 else "the world"
    return (f"elastic layout for world {state.world_size}: {pp}TP {state.tp_size}, DP {state.dp_size}, "
            f"ETP {state.etp_size}, EP per MoE layer {list(state.moe_ep_sizes)}"
            + (f" (--expert-model-parallel-size {configured} does not fit: the largest EP size not above it that "
               f"divides {world} and the experts)" if fell_back else " (as configured)"))


def _ep_by_layer(ep_sizes: tuple[int, ...], experts_by_layer: Mapping[int, int]) -> dict[int, int]:
    """``--expert-model-parallel-size`` (one value, or one per MoE layer) spread over the MoE
    layers."""
    layers = sorted(experts_by_layer)
    if not layers:
        if ep_sizes != (1,):
            raise ValueError("--expert-model-parallel-size needs --num-experts (the model has no MoE layer)")
        return {}
    if len(ep_sizes) not in (1, len(layers)):
        raise ValueError(
            f"--expert-model-parallel-size got {len(ep_sizes)} values {list(ep_sizes)}; give one value or one per "
            f"MoE layer ({len(layers)} MoE layers: {layers})"
        )
    return {layer: ep_sizes[0] if len(ep_sizes) == 1 else ep_sizes[i] for i, layer in enumerate(layers)}


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
    embedding_group: dist.ProcessGroup | None = None  # first and last stage's rank of this stage_rank (PP > 1)
    embedding_ranks: list[int] = field(default_factory=list)
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


def consecutive_rank_lists(world_size: int, size: int) -> list[list[int]]:
    """Blocks of ``size`` consecutive ranks: the TP groups (size TP) and the ETP groups (size ETP)."""
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def dp_rank_lists(world_size: int, tp: int) -> list[list[int]]:
    return [list(range(t, world_size, tp)) for t in range(tp)]


def ep_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [
        [start + e * etp + t for e in range(ep)] for start in range(0, world_size, block) for t in range(etp)
    ]


def edp_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [list(range(offset, world_size, block)) for offset in range(block)]


def in_every_stage(rank_lists: list[list[int]], stage_size: int, pp: int) -> list[list[int]]:
    """``rank_lists`` of one stage's ranks (0 .. stage_size - 1), repeated for each of the ``pp``
    stages with its global ranks (stage p's rank r is ``p * stage_size + r``)."""
    return [[p * stage_size + r for r in ranks] for p in range(pp) for ranks in rank_lists]


def pp_rank_lists(world_size: int, pp: int) -> list[list[int]]:
    stage = world_size // pp
    return [[p * stage + r for p in range(pp)] for r in range(stage)]


def embedding_rank_lists(world_size: int, pp: int) -> list[list[int]]:
    """The first and last stage's rank of each stage_rank."""
    stage = world_size // pp
    return [[r, (pp - 1) * stage + r] for r in range(stage)]


def embedding_dp_rank_lists(world_size: int, pp: int, tp: int) -> list[list[int]]:
    """For each tp_rank, the first stage's DP group followed by the last stage's."""
    stage = world_size // pp
    return [dp + [(pp - 1) * stage + r for r in dp] for dp in dp_rank_lists(stage, tp)]


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
    fitting = {ep for ep in config.expert_model_parallel_size if _ep_misfit(config, ep) is None}
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
        # Only the first and last stage's ranks are in an embedding group (the others get none).
        pipeline["embedding_group"], pipeline["embedding_ranks"] = _new_groups(
            embedding_rank_lists(world_size, pp), rank, create_groups, member=False)
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
