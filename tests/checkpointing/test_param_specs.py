"""The shard arithmetic the converter relies on, checked without processes: cutting a full
tensor into a layout's shards and joining them back is exact, vocabulary padding is made of
zeros and refused otherwise, and the optimizer ranges a layout's ranks own tile each tensor."""

import math

import pytest
import torch

from megamoe.checkpointing.format import SavedTopology
from megamoe.checkpointing.convert.full_state import stream_groups
from megamoe.checkpointing.param_specs import ParamSpec, model_specs

from tests.checkpointing.optimizer_ranges import owned_ranges, target_ep_sizes
from tests.checkpointing.save_load import model_config

EMBEDDING = ParamSpec(
    "word_embeddings.weight", (300, 8), torch.float32, tensor_parallel_dim=0, is_expert=False, padded=True
)
EXPERT_FC1 = ParamSpec(
    "layers.0.mlp.experts.fc1", (4, 2, 8, 6), torch.float32, tensor_parallel_dim=2, is_expert=True, padded=False
)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_cut_and_join_are_exact(tp, ep):
    for spec in (EMBEDDING, EXPERT_FC1):
        full = torch.randn(spec.shape)
        eps = range(ep) if spec.is_expert else range(1)
        ep_size = ep if spec.is_expert else None
        shards = [[spec.shard(full, tp=tp, tp_rank=t, ep_size=ep_size, ep_rank=e) for t in range(tp)] for e in eps]
        for row in shards:
            for shard in row:
                assert tuple(shard.shape) == spec.local_shape(tp, ep_size)
        assert torch.equal(spec.unshard(shards, where="test"), full)


def test_vocabulary_padding_is_zero_and_checked():
    full = torch.randn(EMBEDDING.shape)
    shards = [[EMBEDDING.shard(full, tp=2, tp_rank=t, ep_size=None, ep_rank=0) for t in range(2)]]
    assert shards[0][0].shape[0] == 256 and shards[0][1][300 - 256 :].abs().sum() == 0  # 512 rows at TP 2
    shards[0][1][100, 3] = 1.0
    with pytest.raises(ValueError, match=r"word_embeddings.weight has non-zero values in its vocabulary padding"):
        EMBEDDING.unshard(shards, where="test")


def test_model_specs_come_from_the_model():
    specs = model_specs(model_config((2, 1)))
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


@pytest.mark.parametrize("world, tp, eps", [(4, 2, (2, 1)), (8, 1, (4, 1)), (8, 2, (4, 2))])
def test_zero1_ranges_tile_every_tensor_over_its_reduction_group(world, tp, eps):
    config = model_config(eps)
    specs = model_specs(config)
    ep_of = target_ep_sizes(specs, config)
    layout = SavedTopology(world, tp, eps, use_distributed_optimizer=True)
    owned = [owned_ranges(specs, ep_of, layout, rank=r, bucket_size=2000) for r in range(world)]
    for name, spec in specs.items():
        ep = ep_of[name]
        numel = math.prod(spec.local_shape(tp, ep))
        for t in range(tp):
            for e in range(ep or 1):
                ranges = sorted(
                    owned[r][name] for r in layout.holders(tp_rank=t, ep_size=ep, ep_rank=e) if name in owned[r]
                )
                assert [0] + [end for _, end in ranges] == [start for start, _ in ranges] + [numel], (name, ranges)
