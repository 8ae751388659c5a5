"""A model is built for any layout in one process, without torch.distributed: the layout is an
argument, not process-global state.  Every rank's parameters have that rank's shapes, and the
ranks of a layout together hold exactly the TP=1, EP=1 model's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.model.gpt import GPTModel
from megamoe.parallel.params import param_meta
from megamoe.parallel.sharding import EXPERT_DIM
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.state import build_parallel_state
from tests.tiny_moe import tiny_config

SEED = 3


CONFIG = tiny_config(add_bias_linear=True)


def _layout(world: int, rank: int, tp: int, ep_sizes):
    parallel = ParallelConfig(world_size=world, tensor_model_parallel_size=tp, expert_model_parallel_size=tuple(ep_sizes))
    return build_parallel_state(parallel, rank=rank, create_groups=False, experts_by_layer=CONFIG.experts_by_layer())


def _assemble(models: list[GPTModel]) -> dict[str, torch.Tensor]:
    """Full tensors from the models of every rank of one layout (no collective: concatenation of
    the TP shards of one EP rank, then of the EP ranks of one TP rank, padding dropped)."""
    full = {}
    first = models[0]
    for name, p in first.named_parameters():
        meta = param_meta(p)
        by_coord = {}
        for m in models:
            layout = m.layout
            ep_rank = layout.experts(meta.expert_parallel_size).ep_rank if meta.is_expert else 0
            by_coord.setdefault((ep_rank, layout.tp_rank), dict(m.named_parameters())[name].detach())
        tp, ep = first.layout.tp_size, (meta.expert_parallel_size or 1)
        per_ep = []
        for e in range(ep):
            shards = [by_coord[(e, t)] for t in range(tp)]
            t = torch.cat(shards, dim=meta.tensor_parallel_dim) if meta.tensor_parallel_dim is not None else shards[0]
            if meta.unpadded_size is not None:
                t = t.narrow(meta.tensor_parallel_dim, 0, meta.unpadded_size)
            per_ep.append(t)
        full[name] = torch.cat(per_ep, dim=EXPERT_DIM) if meta.is_expert else per_ep[0]
    return full


LAYOUTS = [(8, 1, (1, 1)), (8, 2, (2, 4)), (8, 4, (2, 1)), (4, 2, (2, 2)), (2, 2, (1, 1))]


@pytest.mark.parametrize("world,tp,eps", LAYOUTS)
def test_every_rank_of_a_layout_builds_in_one_process(world, tp, eps):
    assert not dist.is_initialized()
    reference = GPTModel(CONFIG, _layout(1, 0, 1, (1,))).initialize(SEED)
    want = {n: p.detach() for n, p in reference.named_parameters()}
    models = [GPTModel(CONFIG, _layout(world, r, tp, eps)).initialize(SEED) for r in range(world)]
    for m in models:
        for name, p in m.named_parameters():
            meta = param_meta(p)
            shape = list(reference.get_parameter(name).shape)
            if meta.tensor_parallel_dim is not None:
                shape[meta.tensor_parallel_dim] //= tp
            if meta.is_expert:
                shape[EXPERT_DIM] //= meta.expert_parallel_size
            if meta.unpadded_size is not None:  # the vocabulary is padded per TP size
                shape[meta.tensor_parallel_dim] = m.word_embeddings.local_vocab
            assert list(p.shape) == shape, (name, world, tp, eps, m.layout.rank)
    got = _assemble(models)
    assert got.keys() == {n for n, _ in reference.named_parameters()}
    for name, tensor in got.items():
        w = want[name]
        if param_meta(reference.get_parameter(name)).unpadded_size is not None:
            w = w[: reference.config.vocab_size]
        assert torch.equal(tensor, w), (name, world, tp, eps)


def test_meta_device_lists_the_shapes_of_a_large_layout():
    layout = _layout(64, 13, 4, (4,))  # rank 13: tp_rank 1, dp_rank 3, ep_rank 3
    model = GPTModel(CONFIG, layout, device=torch.device("meta"))
    fc1 = model.layers[0].mlp.experts.fc1
    assert fc1.is_meta
    assert fc1.shape[EXPERT_DIM] == 1 and fc1.shape[-2] == 32 // 4 and fc1.shape[-1] == 32


def test_a_groupless_single_rank_layout_runs_forward_and_backward():
    model = GPTModel(CONFIG, _layout(1, 0, 1, (1,))).initialize(SEED)
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens, tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters())


def test_a_layout_that_does_not_fit_the_model_names_the_flag():
    with pytest.raises(ValueError, match=r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"):
        GPTModel(CONFIG, _layout(8, 0, 8, (1,)), device=torch.device("meta"))
