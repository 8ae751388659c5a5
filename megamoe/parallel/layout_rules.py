"""The rules of a parallel layout: the one place a ``ParallelConfig`` is checked against its world
and the model's experts (``validate_parallel_layout``), and where what it leaves open is derived
from it (the ETP default, each MoE layer's EP size and its ``--elastic`` fallback, each pipeline
rank's model chunks).  Which ranks form each group is ``megamoe.parallel.rank_lists``'s.

``sequence_parallel`` (``--sequence-parallel``, needs TP > 1) is part of the layout: outside the
TP GEMMs each TP rank holds ``1/TP`` of the sequence.  ETP different from TP needs it, because
only then does each rank route tokens of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from megamoe.int_list import divisors
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.pipeline.stages import stage_layer_counts, stage_layer_ranges, virtual_stage_count

if TYPE_CHECKING:
    from megamoe.parallel.state import ParallelState


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
            f"valid values: {divisors(world)}"
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
            f"--tensor-model-parallel-size {tp} does not divide {where}; valid values: {divisors(world)}"
        )
    if config.sequence_parallel and tp == 1:
        raise ValueError(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (got 1); "
            f"valid --tensor-model-parallel-size values with it: {divisors(world)[1:]}"
        )
    etp = resolved_expert_tensor_parallel_size(config)
    if etp < 1 or world % etp != 0:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} does not divide {where}; valid values: {divisors(world)}"
        )
    if etp != tp and not config.sequence_parallel:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size {tp}: "
            f"that needs --sequence-parallel (each TP rank then routes its own tokens); valid without it: {tp}"
        )
    if experts_by_layer is None:
        for ep in config.expert_model_parallel_size:
            misfit = ep_misfit(config, ep)
            if misfit is not None and not config.elastic:
                raise ValueError(misfit)
        return {}
    ep_by_layer = _ep_by_layer(config.expert_model_parallel_size, experts_by_layer)
    for layer, ep in ep_by_layer.items():
        misfit = ep_misfit(config, ep, experts_by_layer[layer], layer)
        if misfit is not None:
            if not config.elastic:
                raise ValueError(misfit)
            ep_by_layer[layer] = elastic_ep_size(config, ep, experts_by_layer[layer])
    return ep_by_layer


def ep_misfit(config: ParallelConfig, ep: int, experts: int | None = None, layer: int | None = None) -> str | None:
    """Why EP size ``ep`` cannot split ``experts`` (layer ``layer``; None: any count) over
    ``config``'s world, in one line naming the flags and the valid values; None when it can.
    The rules: EP divides the experts; EP x ETP divides the world; with ETP = TP, EP divides DP
    (an EP group is then made of ranks with one TP rank)."""
    world, tp, dp = config.stage_world_size, config.tensor_model_parallel_size, config.data_parallel_size
    etp = resolved_expert_tensor_parallel_size(config)
    if ep < 1 or (experts is not None and experts % ep != 0):
        return (f"--num-experts {experts} (layer {layer}) is not divisible by --expert-model-parallel-size {ep}; "
                f"valid expert-parallel sizes: {divisors(experts or 1)}")
    if etp == tp and dp % ep != 0:
        return (f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                f"({_stage_words(config)} / tensor-parallel {tp}); valid values: {divisors(dp)}")
    if (world // etp) % ep != 0:
        return (f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not divide "
                f"{_stage_words(config)}; valid --expert-model-parallel-size values: {divisors(world // etp)}")
    return None


def elastic_ep_size(config: ParallelConfig, ep: int, experts: int) -> int:
    """The EP size an ``--elastic`` run gives a MoE layer of ``experts`` configured with EP ``ep``:
    the largest size not above ``ep`` that fits one pipeline stage of ``config``'s world (world /
    PP ranks; see ``ep_misfit``); 1 always fits."""
    return max(e for e in range(1, ep + 1) if ep_misfit(config, e, experts) is None)


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
