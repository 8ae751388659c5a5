"""Hidden dropout on the residual stream: without sequence parallelism the TP ranks hold the same
positions and must drop the same elements; with it each TP rank holds other positions and must
draw its own mask (the same mask on every TP rank would repeat one pattern along the sequence)."""

import torch
import torch.distributed as dist

from megamoe.model.gpt import hidden_dropout
from megamoe.parallel.random import model_parallel_seed
from tests.harness import init_layout, run_distributed


def _masks_body(rank, world):
    out = {}
    for sequence_parallel in (False, True):
        layout = init_layout(2, sp=sequence_parallel)
        model_parallel_seed(1234, layout)
        mask = hidden_dropout(torch.ones(2, 8, 16), 0.5, True, layout) != 0
        masks = [torch.empty_like(mask) for _ in range(layout.tp_size)]
        dist.all_gather(masks, mask, group=layout.tp_group)
        out[sequence_parallel] = torch.equal(masks[0], masks[1])
    return out


def test_hidden_dropout_masks_are_shared_over_tp_and_per_rank_under_sequence_parallelism():
    for same in run_distributed(_masks_body, 2):
        assert same == {False: True, True: False}, same
