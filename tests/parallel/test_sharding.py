"""The sharding rule, checked against hand-written blocks and for tiling: a dense parameter is
cut over TP (its vocabulary padded), an expert parameter over ETP and EP as the folded layout
places the ranks, an untagged tensor is whole everywhere, and the blocks of all ranks of a
layout cover the padded global tensor, ranks with the same block holding the same slice."""

import pytest
import torch

from megamoe.parallel.params import ParamMeta
from megamoe.parallel.sharding import placement
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.state import build_parallel_state

EMBEDDING = ParamMeta(tensor_parallel_dim=0, unpadded_size=300)  # [V, h], 300 rows padded per TP size
ROW_PARALLEL = ParamMeta(tensor_parallel_dim=1)  # [h, F]


def expert_fc1(ep: int) -> ParamMeta:
    return ParamMeta(tensor_parallel_dim=2, expert_parallel_size=ep)  # [E, 2, F, h]


def state(world: int, rank: int, tp: int, ep: int, etp: int | None = None):
    parallel = ParallelConfig(world_size=world, tensor_model_parallel_size=tp, expert_model_parallel_size=(ep,),
                              expert_tensor_parallel_size=etp, sequence_parallel=etp is not None and etp != tp)
    return build_parallel_state(parallel, rank=rank, create_groups=False)


def test_dense_parameters_are_cut_over_tp_and_the_vocabulary_padded():
    at = placement((256, 8), EMBEDDING, state(4, 3, 2, 1))  # TP rank 1 of 2: 512 padded rows
    assert (at.offsets, at.padded_shape, at.global_shape) == ((256, 0), (512, 8), (300, 8))
    at = placement((16, 12), ROW_PARALLEL, state(8, 6, 4, 1))  # TP rank 2 of 4
    assert (at.offsets, at.padded_shape, at.global_shape) == ((0, 24), (16, 48), (16, 48))


def test_expert_parameters_are_cut_over_etp_and_ep_as_the_folded_layout_places_the_ranks():
    # ETP = TP 2, EP 2 on 4 ranks: rank 3 = (edp 0 * EP 2 + ep 1) * ETP 2 + etp 1.
    at = placement((2, 2, 4, 6), expert_fc1(2), state(4, 3, 2, 2))
    assert (at.offsets, at.global_shape) == ((2, 0, 4, 0), (4, 2, 8, 6))
    # ETP 1, EP 4 on 8 ranks with TP 2: rank 6 = (edp 1 * EP 4 + ep 2) * 1, whole experts.
    at = placement((1, 2, 8, 6), expert_fc1(4), state(8, 6, 2, 4, etp=1))
    assert (at.offsets, at.global_shape) == ((2, 0, 0, 0), (4, 2, 8, 6))


def test_an_untagged_tensor_is_whole_on_every_rank():
    at = placement((4, 3), None, state(4, 3, 2, 2))
    assert (at.offsets, at.padded_shape, at.global_shape) == ((0, 0), (4, 3), (4, 3))


@pytest.mark.parametrize("world, tp, ep, etp", [(4, 2, 2, None), (8, 2, 4, 1), (8, 4, 2, None), (8, 2, 2, 4)])
def test_the_blocks_of_a_layout_tile_the_global_tensor(world, tp, ep, etp):
    etp_size = tp if etp is None else etp
    local = {
        "embedding": ((512 // tp, 8), EMBEDDING),
        "row_parallel": ((16, 48 // tp), ROW_PARALLEL),
        "expert_fc1": ((4 // ep, 2, 8 // etp_size, 6), expert_fc1(ep)),
    }
    for name, (shape, meta) in local.items():
        covered, holders = None, {}
        for rank in range(world):
            at = placement(shape, meta, state(world, rank, tp, ep, etp))
            if covered is None:
                covered = torch.zeros(at.padded_shape, dtype=torch.int64)
            covered[at.index] += 1
            holders.setdefault(at.offsets, []).append(rank)
        copies = world // len(holders)  # every block is held by as many ranks
        assert all(len(ranks) == copies for ranks in holders.values()), (name, holders)
        assert bool((covered == copies).all()), (name, covered.unique())
