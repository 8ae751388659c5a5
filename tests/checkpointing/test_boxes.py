"""The geometry a version 2 checkpoint is made of: a ZeRO-1 range of a flattened tensor cut into
boxes covers exactly that range in order, and a checkpoint saved in one layout loads every
parameter and persistent buffer (the router's expert bias) into another."""

import random

import pytest
import torch

from megamoe.checkpointing.boxes import Box, flat_range_boxes
from tests.harness import run_distributed
from tests.tiny_moe import SEED, build_model, build_optimizer, full_params, tiny_config


@pytest.mark.parametrize("shape", [(), (7,), (5, 6), (3, 4, 5), (2, 3, 1, 4)], ids=str)
def test_flat_range_boxes_cover_the_range_in_order(shape):
    numel = torch.Size(shape).numel()
    flat = torch.arange(numel)
    tensor = flat.view(shape)
    rng = random.Random(0)
    ranges = [(0, numel), (0, 0)] + [tuple(sorted(rng.sample(range(numel + 1), 2))) for _ in range(30) if numel > 1]
    for start, end in ranges:
        boxes = flat_range_boxes(shape, start, end)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
        covered = start
        for box, flat_start, flat_end in boxes:
            assert flat_start == covered
            index = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))
            assert torch.equal(tensor[index].reshape(-1), flat[flat_start:flat_end])
            covered = flat_end
        assert covered == (end if end > start else start)


def test_box_intersection():
    a, b = Box((0, 2), (4, 4)), Box((2, 0), (4, 4))
    assert a.intersect(b) == Box((2, 2), (2, 2))
    assert a.intersect(Box((4, 0), (1, 1))) is None
    assert Box((2, 2), (2, 2)).within(a) == (slice(2, 4), slice(0, 2))


def _save_or_load(rank, world, root, tp, ep, zero, save):
    """Save (``save``) or load the tiny MoE with expert biases at TP ``tp``, EP ``ep``; return its
    full parameters and expert biases on rank 0.  The loading model starts from other weights."""
    from megamoe.training import checkpoint as ckpt

    config = tiny_config(vocab_size=300, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    model = build_model(config, tp, (ep,), seed=SEED if save else SEED + 1)
    opt = build_optimizer(model, zero=zero)
    if save:
        for index, (name, buffer) in enumerate(model.named_buffers()):
            if name.endswith("expert_bias"):
                buffer.copy_(torch.linspace(-1.0, 1.0, buffer.numel()) * (index + 1))
        ckpt.save_checkpoint(root, iteration=1, consumed_samples=0, model=model, optimizer=opt, model_config=config,
                             layout=model.layout, use_distributed_optimizer=zero, args={"seed": SEED})
    else:
        loaded = ckpt.open_checkpoint(root, config, model.layout)
        loaded.load_model(model)
        loaded.load_optimizer(opt, model)
    full = full_params(model)
    full.update({name: b.clone() for name, b in model.named_buffers() if name.endswith("expert_bias")})
    return full if rank == 0 else None


def test_parameters_and_buffers_load_into_another_layout(tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_distributed(_save_or_load, 4, root, 2, 2, True, True, timeout=300)[0]
    loaded = run_distributed(_save_or_load, 1, root, 1, 1, False, False, timeout=300)[0]
    assert saved.keys() == loaded.keys() and any(name.endswith("expert_bias") for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
