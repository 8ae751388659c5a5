"""Process groups: membership follows the documented layout, collectives stay inside their group,
and invalid layouts are refused with the flag named."""

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import layout_rules
from megamoe.parallel import state as ps
from megamoe.parallel.config import ParallelConfig
from tests.harness import init_layout, run_distributed


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


def _parallel(*, world_size, tensor_model_parallel_size, expert_model_parallel_sizes, expert_tensor_parallel_size=None,
              sequence_parallel=False) -> ParallelConfig:
    return ParallelConfig(world_size=world_size, tensor_model_parallel_size=tensor_model_parallel_size,
                          expert_model_parallel_size=tuple(expert_model_parallel_sizes),
                          expert_tensor_parallel_size=expert_tensor_parallel_size, sequence_parallel=sequence_parallel)


def _validate(**sizes) -> None:
    layout_rules.validate_parallel_layout(_parallel(**sizes))


def _build(*, rank, create_groups, **sizes):
    return ps.build_parallel_state(_parallel(**sizes), rank=rank, create_groups=create_groups)


LAYOUTS = {  # world size -> (TP, EP sizes) layouts
    1: [(1, (1,))],
    2: [(1, (1, 2)), (2, (1,))],
    4: [(1, (1, 2, 4)), (2, (1, 2)), (4, (1,))],
    8: [(1, (2, 4, 8)), (2, (2, 4)), (4, (2,)), (8, (1,))],
}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_group_membership_matches_documented_layout(world):
    """Every rank's TP, DP, EP and EDP ranks follow the formula; checked on group-less layouts in
    one process (the groups ``initialize_model_parallel`` creates are these: see the next test)."""
    for tp, eps in LAYOUTS[world]:
        for rank in range(world):
            state = _build(world_size=world, rank=rank, tensor_model_parallel_size=tp,
                                            expert_model_parallel_sizes=eps, create_groups=False)
            assert (state.tp_rank, state.dp_rank) == (rank % tp, rank // tp)
            for ep in eps:
                want, groups = _expected(world, tp, ep, rank), state.experts(ep)
                assert (state.tp_ranks, state.dp_ranks) == (want["tp"], want["dp"]), (tp, ep, rank)
                assert (groups.ep_ranks, groups.edp_ranks) == (want["ep"], want["edp"]), (tp, ep, rank)
                assert groups.edp_size == world // tp // ep


def _groups_body(rank, world):
    """An invalid EP size refused before any group exists.  Then for each layout: an all-reduce of the rank id in each created group sums exactly its documented
    members, and an EP size that was not initialised is refused."""
    with pytest.raises(ValueError, match="--expert-model-parallel-size 3"):
        init_layout(1, (3,))
    for tp, eps in LAYOUTS[world]:
        state = init_layout(tp, eps)
        for ep in eps:
            want, groups = _expected(world, tp, ep, rank), state.experts(ep)
            for key, group in (("tp", state.tp_group), ("dp", state.dp_group), ("ep", groups.ep_group),
                               ("edp", groups.edp_group)):
                x = torch.tensor([float(rank)])
                dist.all_reduce(x, group=group)
                assert x.item() == sum(want[key]), (tp, ep, key, x.item(), want[key])
        missing = next(size for size in (2, 4, 8) if size not in eps)
        with pytest.raises(ValueError, match=f"expert-parallel size {missing} is not part of this layout"):
            state.experts(missing)


def test_created_groups_hold_the_documented_members_and_initialize_validates_first():
    run_distributed(_groups_body, 4)


def test_invalid_parallel_sizes_name_the_flag():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 does not divide the world size 4"):
        _validate(world_size=4, tensor_model_parallel_size=3, expert_model_parallel_sizes=(1,))
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 4 does not divide the data-parallel size 2.*\[1, 2\]"):
        _validate(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_sizes=(4,))


def _folded_expected(world, etp, ep, rank):
    """The expert groups of the documented folding: rank = (edp_rank * EP + ep_rank) * ETP + etp_rank."""
    etp_rank, ep_rank, edp_rank = rank % etp, (rank // etp) % ep, rank // (etp * ep)
    return {
        "etp": [rank - etp_rank + t for t in range(etp)],
        "ep": [(edp_rank * ep + e) * etp + etp_rank for e in range(ep)],
        "edp": [(d * ep + ep_rank) * etp + etp_rank for d in range(world // (ep * etp))],
    }


@pytest.mark.parametrize(
    "world,tp,etp,eps",
    [(4, 2, 1, (2, 4)), (8, 2, 1, (2, 4, 8)), (8, 4, 2, (2, 4)), (8, 2, 2, (2, 4)), (8, 2, 4, (2,))],
)
def test_expert_groups_fold_over_tensor_and_data_parallel_ranks(world, tp, etp, eps):
    """Checked on group-less layouts in one process: every rank's ETP, EP and EDP ranks follow the
    formula, and with ETP = TP they are the classic groups (EP consecutive ranks of a DP group)."""
    for rank in range(world):
        state = _build(world_size=world, rank=rank, tensor_model_parallel_size=tp,
                                        expert_model_parallel_sizes=eps, create_groups=False,
                                        expert_tensor_parallel_size=etp, sequence_parallel=True)
        for ep in eps:
            want, groups = _folded_expected(world, etp, ep, rank), state.experts(ep)
            assert (groups.etp_ranks, groups.ep_ranks, groups.edp_ranks) == (want["etp"], want["ep"], want["edp"])
            assert groups.etp_rank == rank % etp and groups.edp_size == world // (ep * etp)
            if etp == tp:
                assert groups.ep_ranks == _expected(world, tp, ep, rank)["ep"]


def test_sequence_parallel_and_expert_tensor_parallel_errors_name_the_flags():
    with pytest.raises(ValueError, match=r"--sequence-parallel needs --tensor-model-parallel-size > 1 \(got 1\)"):
        _validate(world_size=4, tensor_model_parallel_size=1, expert_model_parallel_sizes=(1,),
                                   sequence_parallel=True)
    with pytest.raises(ValueError, match=r"--expert-tensor-parallel-size 3 does not divide the world size 4; "
                                         r"valid values: \[1, 2, 4\]"):
        _validate(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_sizes=(1,),
                                   expert_tensor_parallel_size=3, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"--expert-tensor-parallel-size 1 differs from --tensor-model-parallel-size 2: "
                                         r"that needs --sequence-parallel"):
        _validate(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_sizes=(1,),
                                   expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 8 x --expert-tensor-parallel-size 1 does not "
                                         r"divide the world size 4; valid --expert-model-parallel-size values: \[1, 2, 4\]"):
        _validate(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_sizes=(8,),
                                   expert_tensor_parallel_size=1, sequence_parallel=True)
