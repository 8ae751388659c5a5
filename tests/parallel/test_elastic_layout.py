"""The layout of an ``--elastic`` run in a world of another size (megamoe.parallel.state): TP and
ETP are kept, DP follows the world, and an EP size that no longer fits falls back to the largest
size not above it that divides what it must and the layer's experts; without --elastic the same
layout is refused.  A global batch the new world cannot split is refused naming the nearest valid
sizes."""

import pytest

from megamoe.parallel import state as ps
from megamoe.parallel.config import ParallelConfig
from tests.fixtures import TINY_MOE, assert_config_error


def _config(world, ep, tp=1, etp=None, elastic=True):
    return ParallelConfig(world_size=world, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp, sequence_parallel=tp > 1, elastic=elastic)


@pytest.mark.parametrize("world,tp,etp,ep,experts,want", [
    (4, 1, None, (2,), 4, 2),      # still fits: kept
    (2, 1, None, (4,), 4, 2),      # half the world: EP 4 -> 2
    (3, 1, None, (2,), 4, 1),      # DP 3 and 4 experts share only 1
    (6, 1, None, (4,), 8, 2),      # divides DP 6 and 8 experts
    (6, 1, None, (4,), 6, 3),      # divides DP 6 and 6 experts
    (6, 2, None, (2,), 8, 1),      # TP 2 kept: DP 3
    (6, 2, 1, (4,), 8, 2),         # ETP 1 (SP): EP x ETP divides the world 6
])
def test_an_ep_size_that_no_longer_fits_falls_back_to_the_largest_that_does(world, tp, etp, ep, experts, want):
    config = _config(world, ep, tp, etp)
    assert ps.validate_parallel_layout(config, {1: experts, 3: experts}) == {1: want, 3: want}
    refused = _config(world, ep, tp, etp, elastic=False)
    if want == ep[0]:
        ps.validate_parallel_layout(refused, {1: experts})
    else:
        with pytest.raises(ValueError, match=f"--expert-model-parallel-size {ep[0]}"):
            ps.validate_parallel_layout(refused, {1: experts})


def test_each_layer_falls_back_on_its_own_and_the_groups_are_those_of_the_chosen_sizes():
    config = _config(2, (4, 1, 2))
    state = ps.build_parallel_state(config, rank=1, create_groups=False, experts_by_layer={0: 4, 1: 4, 2: 4})
    assert state.ep_by_layer == {0: 2, 1: 1, 2: 2}
    assert sorted(state.expert) == [1, 2]
    assert state.experts(2).ep_ranks == [0, 1]
    line = ps.elastic_layout_line(config, state)
    assert line == ("elastic layout for world 2: TP 1, DP 2, ETP 1, EP per MoE layer [2, 1, 2] "
                    "(--expert-model-parallel-size [4, 1, 2] does not fit: the largest EP size not above it that "
                    "divides the world and the experts)")
    kept = ps.build_parallel_state(_config(4, (2,)), rank=0, create_groups=False, experts_by_layer={0: 4})
    assert ps.elastic_layout_line(_config(4, (2,)), kept).endswith("EP per MoE layer [2] (as configured)")
    assert ps.elastic_layout_line(_config(4, (2,), elastic=False), kept) is None


def test_tp_is_never_changed_and_without_experts_an_unfitting_ep_is_left_for_the_model():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 4 does not divide the world size 2"):
        ps.validate_parallel_layout(_config(2, (1,), tp=4), {0: 4})
    assert ps.validate_parallel_layout(_config(2, (4,)), None) == {}
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 4 does not divide the data-parallel size 2"):
        ps.validate_parallel_layout(_config(2, (4,), elastic=False), None)


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
