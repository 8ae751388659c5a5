"""The layout of an ``--elastic`` run in a world of another size (megamoe.parallel.layout_rules):
PP, TP and ETP are kept, DP follows the world, and an EP size that no longer fits falls back to
the largest size not above it that divides what it must within one pipeline stage (world / PP
ranks) and the layer's experts; without --elastic the same layout is refused.  A PP or TP that no longer
fits, a global batch the new world cannot split, or too few micro-batches for the pipeline
schedule, is refused in one line."""

import pytest

from megamoe.parallel import layout_rules
from megamoe.parallel import state as ps
from megamoe.parallel.config import ParallelConfig
from tests.fixtures import TINY_MOE, assert_config_error


def _config(world, ep, tp=1, etp=None, elastic=True, pp=1):
    return ParallelConfig(world_size=world, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp, sequence_parallel=tp > 1, elastic=elastic,
                          pipeline_model_parallel_size=pp, pipeline_num_layers=4 if pp > 1 else None)


@pytest.mark.parametrize("world,tp,etp,ep,experts,want,pp", [
    (4, 1, None, (2,), 4, 2, 1),      # still fits: kept
    (2, 1, None, (4,), 4, 2, 1),      # half the world: EP 4 -> 2
    (3, 1, None, (2,), 4, 1, 1),      # DP 3 and 4 experts share only 1
    (6, 1, None, (4,), 8, 2, 1),      # divides DP 6 and 8 experts
    (6, 1, None, (4,), 6, 3, 1),      # divides DP 6 and 6 experts
    (6, 2, None, (2,), 8, 1, 1),      # TP 2 kept: DP 3
    (6, 2, 1, (4,), 8, 2, 1),         # ETP 1 (SP): EP x ETP divides the world 6
    (8, 1, None, (4,), 4, 4, 2),      # PP 2 kept, a stage of 4: EP 4 kept
    (4, 1, None, (4,), 4, 2, 2),      # PP 2 kept, a stage of 2 (EP 4 would fit the world of 4, not a stage)
    (6, 1, None, (2,), 4, 1, 2),      # a stage of 3: DP 3
    (12, 2, None, (4,), 8, 1, 2),     # PP 2 x TP 2 kept: DP 3 in a stage of 6
    (12, 2, 1, (4,), 8, 2, 2),        # ETP 1 (SP): EP x ETP divides a stage of 6
])
def test_an_ep_size_that_no_longer_fits_falls_back_to_the_largest_that_does(world, tp, etp, ep, experts, want, pp):
    config = _config(world, ep, tp, etp, pp=pp)
    assert layout_rules.validate_parallel_layout(config, {1: experts, 3: experts}) == {1: want, 3: want}
    refused = _config(world, ep, tp, etp, elastic=False, pp=pp)
    if want == ep[0]:
        layout_rules.validate_parallel_layout(refused, {1: experts})
    else:
        with pytest.raises(ValueError, match=f"--expert-model-parallel-size {ep[0]}"):
            layout_rules.validate_parallel_layout(refused, {1: experts})


def test_each_layer_falls_back_on_its_own_and_the_groups_are_those_of_the_chosen_sizes():
    config = _config(2, (4, 1, 2))
    state = ps.build_parallel_state(config, rank=1, create_groups=False, experts_by_layer={0: 4, 1: 4, 2: 4})
    assert state.ep_by_layer == {0: 2, 1: 1, 2: 2}
    assert sorted(state.expert) == [1, 2]
    assert state.experts(2).ep_ranks == [0, 1]
    line = layout_rules.elastic_layout_line(config, state)
    assert line == ("elastic layout for world 2: TP 1, DP 2, ETP 1, EP per MoE layer [2, 1, 2] "
                    "(--expert-model-parallel-size [4, 1, 2] does not fit: the largest EP size not above it that "
                    "divides the world and the experts)")
    kept = ps.build_parallel_state(_config(4, (2,)), rank=0, create_groups=False, experts_by_layer={0: 4})
    assert layout_rules.elastic_layout_line(_config(4, (2,)), kept).endswith("EP per MoE layer [2] (as configured)")
    assert layout_rules.elastic_layout_line(_config(4, (2,), elastic=False), kept) is None


def test_a_pipeline_layout_in_a_shrunk_world_keeps_pp_and_falls_back_within_a_stage():
    """World 8 at PP 2 x EP 4 (4 layers, MoE on 1 and 3), shrunk to 4: each stage has 2 ranks."""
    config = _config(4, (4,), pp=2)
    states = [ps.build_parallel_state(config, rank=r, create_groups=False, experts_by_layer={1: 4, 3: 4})
              for r in range(4)]
    assert [(s.pp_rank, s.dp_rank, s.ep_by_layer) for s in states] == [
        (0, 0, {1: 2, 3: 2}), (0, 1, {1: 2, 3: 2}), (1, 0, {1: 2, 3: 2}), (1, 1, {1: 2, 3: 2})]
    assert [s.model_chunks for s in states] == [(range(0, 2),)] * 2 + [(range(2, 4),)] * 2
    assert states[3].experts(2).ep_ranks == [2, 3] and states[3].pp_ranks == [1, 3]
    assert layout_rules.elastic_layout_line(config, states[3]) == (
        "elastic layout for world 4: PP 2, TP 1, DP 2, ETP 1, EP per MoE layer [2, 2] (--expert-model-parallel-size "
        "[4] does not fit: the largest EP size not above it that divides a stage's ranks and the experts)")
    grown = _config(8, (4,), pp=2)
    state = ps.build_parallel_state(grown, rank=5, create_groups=False, experts_by_layer={1: 4, 3: 4})
    assert layout_rules.elastic_layout_line(grown, state) == (
        "elastic layout for world 8: PP 2, TP 1, DP 4, ETP 1, EP per MoE layer [4, 4] (as configured)")


def test_pp_and_tp_are_never_changed_and_the_pipeline_needs_its_micro_batches():
    with pytest.raises(ValueError, match=r"^--pipeline-model-parallel-size 2 does not divide the world size 3; "
                                         r"valid values: \[1, 3\]$"):
        layout_rules.validate_parallel_layout(_config(3, (1,), pp=2), {1: 4})
    with pytest.raises(ValueError, match=r"^--tensor-model-parallel-size 4 does not divide a pipeline stage's 2 ranks "
                                         r"\(world 4 / --pipeline-model-parallel-size 2\); valid values: \[1, 2\]$"):
        layout_rules.validate_parallel_layout(_config(4, (1,), tp=4, pp=2), {1: 4})
    pp2 = [*TINY_MOE, "--train-iters", "2", "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size",
           "2", "--elastic"]
    from megamoe.training.arguments import parse_config

    cfg = parse_config(pp2, world_size=2)  # shrunk to a stage of 1: EP 1, 4 micro-batches per rank
    assert cfg.parallel.pipeline_model_parallel_size == 2 and cfg.train.num_microbatches == 4
    assert_config_error(pp2, 8, r"^the 1F1B schedule needs at least --pipeline-model-parallel-size 2 micro-batches "
                                r"per step, got 1 ")
    assert_config_error(pp2, 6, r"^--global-batch-size 8 is not divisible by --micro-batch-size 2 x data-parallel "
                                r"size 3 \(world 6 / --tensor-model-parallel-size 1 / --pipeline-model-parallel-size "
                                r"2\); the nearest valid sizes are 6 and 12$")


def test_tp_is_never_changed_and_without_experts_an_unfitting_ep_is_left_for_the_model():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 4 does not divide the world size 2"):
        layout_rules.validate_parallel_layout(_config(2, (1,), tp=4), {0: 4})
    assert layout_rules.validate_parallel_layout(_config(2, (4,)), None) == {}
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 4 does not divide the data-parallel size 2"):
        layout_rules.validate_parallel_layout(_config(2, (4,), elastic=False), None)


def test_the_flag_and_a_global_batch_the_new_world_cannot_split():
    from megamoe.training.arguments import parse_config

    cfg = parse_config([*TINY_MOE, "--train-iters", "2", "--expert-model-parallel-size", "4", "--elastic"], world_size=2)
    assert cfg.parallel.elastic and cfg.train.num_microbatches == 2
    assert_config_error([*TINY_MOE, "--train-iters", "2", "--expert-model-parallel-size", "4"], 2,
                        r"^--expert-model-parallel-size 4 does not divide the data-parallel size 2")
    assert_config_error([*TINY_MOE, "--train-iters", "2", "--elastic"], 3,
                        r"^--global-batch-size 8 is not divisible by --micro-batch-size 2 x data-parallel size 3 "
                        r"\(world 3 / --tensor-model-parallel-size 1\); the nearest valid sizes are 6 and 12$")
    assert_config_error([*TINY_MOE, "--train-iters", "2", "--global-batch-size", "4"], 3,
                        r"the nearest valid sizes are 6$")
