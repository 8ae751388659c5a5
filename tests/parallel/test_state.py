"""Process groups: membership follows the documented layout, collectives stay inside their group,
and invalid layouts are refused with the flag named."""

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import state as ps
from tests.harness import run_distributed


def _expected(world, tp, ep, rank):
    dp = world // tp
    tp_rank, dp_rank = rank % tp, rank // tp
    dp_ranks = [d * tp + tp_rank for d in range(dp)]
    ep_rank, edp_rank = dp_rank % ep, dp_rank // ep
    return {
        "tp": [dp_rank * tp + t for t in range(tp)],
        "dp": dp_ranks,
        "ep": [dp_ranks[edp_rank * ep + e] for e in range(ep)],
        "edp": [dp_ranks[d * ep + ep_rank] for d in range(dp // ep)],
    }


def _membership_body(rank, world, layouts):
    """For each (tp, ep sizes): groups match the formula and an all-reduce of the rank id
    in each group sums exactly its members."""
    for tp, eps in layouts:
        state = ps.initialize_model_parallel(tp, eps)
        for ep in eps:
            want = _expected(world, tp, ep, rank)
            groups = state.experts(ep)
            assert state.tp_ranks == want["tp"], (tp, ep, state.tp_ranks, want)
            assert state.dp_ranks == want["dp"]
            assert groups.ep_ranks == want["ep"], (tp, ep, groups.ep_ranks, want["ep"])
            assert groups.edp_ranks == want["edp"]
            assert groups.edp_size == world // tp // ep
            for key, group in (("tp", state.tp_group), ("dp", state.dp_group), ("ep", groups.ep_group), ("edp", groups.edp_group)):
                x = torch.tensor([float(rank)])
                dist.all_reduce(x, group=group)
                assert x.item() == sum(want[key]), (key, x.item(), want[key])
        assert state.tp_rank == rank % tp and state.dp_rank == rank // tp
        ps.destroy_model_parallel()


@pytest.mark.parametrize(
    "world,layouts",
    [
        (1, [(1, (1,))]),
        (2, [(1, (1, 2)), (2, (1,))]),
        (4, [(1, (1, 2, 4)), (2, (1, 2)), (4, (1,))]),
        (8, [(1, (2, 4, 8)), (2, (2, 4)), (4, (2,)), (8, (1,))]),
    ],
)
def test_group_membership_matches_documented_layout(world, layouts):
    run_distributed(_membership_body, world, layouts)


def test_invalid_parallel_sizes_name_the_flag():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 does not divide the world size 4"):
        ps.validate_parallel_sizes(world_size=4, tensor_model_parallel_size=3, expert_model_parallel_sizes=(1,))
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 4 does not divide the data-parallel size 2.*\[1, 2\]"):
        ps.validate_parallel_sizes(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_sizes=(4,))


def _uninitialised_body(rank, world):
    with pytest.raises(RuntimeError, match="initialize_model_parallel has not been called"):
        ps.get_parallel_state()
    with pytest.raises(ValueError, match="--expert-model-parallel-size 3"):
        ps.initialize_model_parallel(1, (3,))
    assert not ps.is_initialized()
    state = ps.initialize_model_parallel(2, (1,))
    with pytest.raises(ValueError, match="expert-parallel size 2 was not initialised"):
        state.experts(2)
    ps.destroy_model_parallel()


def test_initialize_validates_before_building_groups():
    run_distributed(_uninitialised_body, 2)
