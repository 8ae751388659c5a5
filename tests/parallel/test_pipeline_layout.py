"""The pipeline layout: which layers each stage holds (the pure function), the rank formula
(PP outermost, every other group inside one stage), the PP and embedding groups, a stage's model
under PP 1's parameter names and values, and the one-line errors of a layout that cannot be."""

import re

import pytest
import torch

from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.pipeline.stages import stage_layer_ranges
from megamoe.parallel.layout_rules import validate_parallel_layout
from megamoe.parallel.state import build_parallel_state
from tests.tiny_moe import SEED, model_config


def test_layers_are_split_evenly_unevenly_and_into_virtual_chunks_in_pipeline_order():
    assert stage_layer_ranges(8, 2) == [(range(0, 4),), (range(4, 8),)]
    assert stage_layer_ranges(8, 2, 2) == [(range(0, 2), range(4, 6)), (range(2, 4), range(6, 8))]
    assert stage_layer_ranges(6, 4, first=1, last=1) == [(range(0, 1),), (range(1, 3),), (range(3, 5),), (range(5, 6),)]
    assert stage_layer_ranges(7, 3, last=1) == [(range(0, 3),), (range(3, 6),), (range(6, 7),)]
    # chunk v of rank p is pipeline chunk v * P + p; uneven stages cut into V chunks each
    assert stage_layer_ranges(12, 2, 2, first=4) == [(range(0, 2), range(6, 8)), (range(2, 6), range(8, 12))]


def _state(rank, **fields):
    config = ParallelConfig(**{"world_size": 16, "pipeline_num_layers": 8, **fields})
    return build_parallel_state(config, rank=rank, create_groups=False, experts_by_layer={i: 4 for i in range(8)})


def test_rank_formula_puts_pipeline_outermost_and_every_other_group_inside_one_stage():
    fields = dict(pipeline_model_parallel_size=2, tensor_model_parallel_size=2, expert_model_parallel_size=(2,))
    for rank in range(16):
        s = _state(rank, **fields)
        stage = range(s.pp_rank * 8, s.pp_rank * 8 + 8)
        assert rank == s.pp_rank * 8 + s.stage_rank and s.stage_ranks == list(stage)
        for ranks in (s.tp_ranks, s.dp_ranks, s.experts(2).ep_ranks, s.experts(2).edp_ranks):
            assert set(ranks) <= set(stage)
        assert s.tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
        assert s.dp_ranks == [s.pp_rank * 8 + d * 2 + s.tp_rank for d in range(4)]
        assert s.pp_ranks == [s.stage_rank, 8 + s.stage_rank]
        assert s.embedding_ranks == [s.stage_rank, 8 + s.stage_rank]
        assert s.embedding_dp_ranks == [d * 2 + s.tp_rank for d in range(4)] + [8 + d * 2 + s.tp_rank for d in range(4)]
        assert s.model_chunks == ((range(0, 4),) if s.is_first_stage else (range(4, 8),))
        assert s.is_first_stage == (rank < 8) and s.is_last_stage == (rank >= 8)
    middle = _state(5, pipeline_model_parallel_size=4)
    assert middle.pp_ranks == [1, 5, 9, 13] and middle.embedding_ranks == [] and middle.embedding_dp_group is None


def test_a_stage_model_holds_its_layers_under_pp_1_names_and_values():
    config = model_config(num_layers=4, moe_layer_freq=(1, 0, 1, 1))
    whole = dict(GPTModel(config, _layout(config, 1, 0)).initialize(SEED).named_parameters())
    first = dict(GPTModel(config, _layout(config, 2, 0)).initialize(SEED).named_parameters())
    last = dict(GPTModel(config, _layout(config, 2, 1)).initialize(SEED).named_parameters())
    assert {n.split(".")[1] for n in first if n.startswith("layers.")} == {"0", "1"}
    assert {n.split(".")[1] for n in last if n.startswith("layers.")} == {"2", "3"}
    assert "word_embeddings.weight" in first and "final_norm.weight" not in first
    # tied embeddings: the last stage holds a copy of the input embedding as its output layer
    assert "word_embeddings.weight" in last and "final_norm.weight" in last
    assert set(first) | set(last) == set(whole)
    for name, p in {**first, **last}.items():
        assert torch.equal(p, whole[name]), name


def _layout(config, pp, pp_rank):
    parallel = ParallelConfig(world_size=pp, pipeline_model_parallel_size=pp, pipeline_num_layers=config.num_layers)
    return build_parallel_state(parallel, rank=pp_rank, create_groups=False,
                                experts_by_layer=config.experts_by_layer())


@pytest.mark.parametrize("fields,message", [
    (dict(pipeline_model_parallel_size=3), "--pipeline-model-parallel-size 3 does not divide the world size 8; "
                                           "valid values: [1, 2, 4, 8]"),
    (dict(pipeline_model_parallel_size=4, tensor_model_parallel_size=4),
     "--tensor-model-parallel-size 4 does not divide a pipeline stage's 2 ranks (world 8 / "
     "--pipeline-model-parallel-size 4); valid values: [1, 2]"),
    (dict(pipeline_model_parallel_size=4, pipeline_num_layers=6), "--num-layers 6 is not divisible by "
                                                         "--pipeline-model-parallel-size 4; valid sizes: [1, 2, 3, 6]"),
    (dict(pipeline_model_parallel_size=4, pipeline_num_layers=8, decoder_first_pipeline_num_layers=3),
     "--num-layers 8 with --decoder-first-pipeline-num-layers 3 leaves 5 layers for the other 3 of "
     "--pipeline-model-parallel-size 4 stages: they must split evenly, at least 1 each"),
    (dict(pipeline_num_layers=8, decoder_last_pipeline_num_layers=2),
     "--decoder-last-pipeline-num-layers 2 needs --pipeline-model-parallel-size > 1 (got 1)"),
    (dict(pipeline_model_parallel_size=2, pipeline_num_layers=8, virtual_pipeline_model_parallel_size=3),
     "--virtual-pipeline-model-parallel-size 3 does not divide every pipeline stage's layers [4, 4]; "
     "valid values: [1, 2, 4]"),
    (dict(pipeline_model_parallel_size=2, pipeline_num_layers=8, num_layers_per_virtual_pipeline_stage=3),
     "--num-layers-per-virtual-pipeline-stage 3 must divide every pipeline stage's layers [4, 4] into the same "
     "number of chunks; valid values: [1, 2, 4]"),
    (dict(pipeline_num_layers=8, virtual_pipeline_model_parallel_size=2),
     "the interleaved schedule (virtual pipeline stages) needs --pipeline-model-parallel-size > 1"),
    (dict(pipeline_model_parallel_size=4, pipeline_num_layers=8, pipeline_num_microbatches=3),
     "the 1F1B schedule needs at least --pipeline-model-parallel-size 4 micro-batches per step, got 3"),
    (dict(pipeline_model_parallel_size=2, pipeline_num_layers=8, virtual_pipeline_model_parallel_size=2,
          pipeline_num_microbatches=3),
     "the interleaved schedule needs the micro-batches per step (3: --global-batch-size / (--micro-batch-size x "
     "data-parallel size)) to be a multiple of --pipeline-model-parallel-size 2"),
    (dict(pipeline_model_parallel_size=2, expert_model_parallel_size=(8,)),
     "--expert-model-parallel-size 8 does not divide the data-parallel size 4 (a pipeline stage's 4 ranks"),
])
def test_a_layout_that_cannot_be_is_one_line_naming_the_flags(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        validate_parallel_layout(ParallelConfig(world_size=8, **fields), {0: 8})
    assert "\n" not in str(err.value)
