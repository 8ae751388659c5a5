"""What a checkpoint records of each parameter, checked without processes: the full forms come
from the model code, and the optimizer ranges the ranks of a layout own tile every block."""

import dataclasses

import pytest
import torch

from megamoe.checkpointing.convert.full_state import stream_groups
from megamoe.checkpointing.format import SavedTopology
from megamoe.checkpointing.param_specs import model_specs
from megamoe.model.gpt import GPTModel
from megamoe.optim.grad_buffer import build_grad_buffers, grad_reduction
from megamoe.parallel.params import param_meta
from megamoe.parallel.sharding import placement
from tests.checkpointing.save_load import CONFIG


def test_model_specs_come_from_the_model():
    specs = model_specs(CONFIG, torch.float32)
    assert len(specs) == 17
    assert specs["word_embeddings.weight"].shape == (300, 32) and specs["word_embeddings.weight"].padded
    assert specs["layers.1.mlp.experts.fc1"].shape == (4, 2, 32, 32) and specs["layers.1.mlp.experts.fc1"].is_expert
    assert [key for key, _ in stream_groups(list(specs))] == [
        "word_embeddings",
        "layers.0",
        "layers.1",
        "final_norm",
        "output_layer",
    ]


@pytest.mark.parametrize("world, tp, eps, etp", [(4, 2, (2, 1), 2), (8, 1, (4, 1), 1), (8, 2, (4, 2), 2), (8, 2, (4, 2), 1)])
def test_zero1_ranges_tile_every_block_over_its_reduction_group(world, tp, eps, etp):
    """Every rank of the layout is built on the meta device (no process group) with the very grad
    buffers its optimizer builds.  The ranks holding one block of a parameter (the same
    ``placement``) form whole reduction groups, each of which owns every element once."""
    config = CONFIG
    topology = SavedTopology(world, tp, eps, use_distributed_optimizer=True, expert_tensor_parallel_size=etp,
                             sequence_parallel=etp != tp)
    blocks = {}  # (name, offsets) -> [owners per element, holders, reduction group size]
    for rank in range(world):
        state = topology.state(rank)
        state = dataclasses.replace(state, ep_by_layer=dict(zip(config.moe_layers, eps)))
        model = GPTModel(config, state, device=torch.device("meta"))
        buffers = build_grad_buffers(model, state, bucket_size=2000, sharded=True)
        owned = {piece.name: (piece.param_start, piece.param_end) for buf in buffers for piece in buf.pieces()}
        for name, param in model.named_parameters():
            meta = param_meta(param)
            key = (name, placement(param.shape, meta, state).offsets)
            block = blocks.setdefault(key, [torch.zeros(param.numel(), dtype=torch.int64), 0, 0])
            block[1] += 1
            block[2] = grad_reduction(meta, state).size
            if name in owned:
                start, end = owned[name]
                block[0][start:end] += 1
    for (name, offsets), (owners, holders, group_size) in blocks.items():
        assert holders % group_size == 0, (name, offsets, holders, group_size)
        assert bool((owners == holders // group_size).all()), (name, offsets, owners.unique())
