"""The layout is an object that megamoe passes around, not process-global state: two layouts live
side by side in one process, each with its own RNG streams and per-layer EP sizes."""

import torch

from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.random import MODEL_PARALLEL_RNG, model_parallel_seed
from megamoe.parallel.state import build_parallel_state, single_rank_layout
from tests.tiny_moe import tiny_config


def test_a_model_draws_attention_dropout_from_its_own_layouts_stream():
    config = tiny_config(attention_dropout=0.5)
    mine, other = single_rank_layout(config.experts_by_layer()), single_rank_layout(config.experts_by_layer())
    model_parallel_seed(1, mine)
    model_parallel_seed(2, other)
    untouched = other.rng.get_states()[MODEL_PARALLEL_RNG]
    before = mine.rng.get_states()[MODEL_PARALLEL_RNG]
    model = GPTModel(config, mine).initialize(seed=3).train()
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert not torch.equal(mine.rng.get_states()[MODEL_PARALLEL_RNG], before), "the model did not use its layout's stream"
    assert torch.equal(other.rng.get_states()[MODEL_PARALLEL_RNG], untouched), "another layout's stream moved"


def test_each_moe_layer_gets_its_ep_size_and_an_mtp_block_that_of_the_last_layer():
    config = tiny_config(num_layers=3, moe_layer_freq=(1, 0, 1), num_experts=(4, 8), mtp_num_layers=1)
    parallel = ParallelConfig(world_size=8, expert_model_parallel_size=(4, 2))
    layout = build_parallel_state(parallel, rank=5, create_groups=False, experts_by_layer=config.experts_by_layer())
    assert layout.ep_by_layer == {0: 4, 2: 2} and layout.moe_ep_sizes == (4, 2)
    model = GPTModel(config, layout, device=torch.device("meta"))
    assert model.layers[0].mlp.ep_size == 4 and model.layers[2].mlp.ep_size == 2
    assert model.mtp[0].block.mlp.ep_size == 2 and model.mtp[0].block.mlp.num_experts == 8
    assert model.layers[2].mlp.experts.fc1.shape[0] == 8 // 2
