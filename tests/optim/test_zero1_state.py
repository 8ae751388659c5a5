"""ZeRO-1 bookkeeping: the optimizer state per rank follows the formula, and the sharded state
round-trips through torch.save / torch.load(weights_only=True) and refuses another layout.

Formula, per part (dense: sharded over DP; experts of EP size E: over their EDP group of size G):
    owned elements summed over the group = the part's local parameter elements (each owned once),
    every rank of the group holds the same shard size (owned + padding),
    bytes = 12 * owned (fp32 master 4 + Adam m 4 + v 4) + 4 * padding (master only).
Without ZeRO-1 a rank owns its whole part.
"""

import io

import pytest
import torch
import torch.distributed as dist

from megamoe.optim.grad_buffer import PARAM_ALIGNMENT
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import param_meta
from tests.harness import current_layout, run_distributed
from tests.tiny_moe import build, forward_backward, train


def _part_of(meta) -> str:
    return "dp" if not meta.is_expert else f"edp(ep={meta.expert_parallel_size})"


def _group_of(part: str):
    state = current_layout()
    if part == "dp":
        return state.dp_group, state.dp_size
    groups = state.experts(int(part[len("edp(ep=") : -1]))
    return groups.edp_group, groups.edp_size


def _memory_body(rank, world):
    for tp, eps, zero, bucket in ((1, (4, 2), True, 5_000), (2, (2, 2), True, 40_000_000), (1, (4, 2), False, 5_000)):
        model, opt = build(tp, eps, zero=zero, bucket_size=bucket)
        forward_backward(model, opt, 0)
        opt.step()  # allocates the Adam moments
        numel, count = {}, {}
        for _, p in model.named_parameters():
            part = _part_of(param_meta(p))
            numel[part] = numel.get(part, 0) + p.numel()
            count[part] = count.get(part, 0) + 1
        stats = opt.memory_stats()
        assert set(stats) == set(numel)
        for part, s in stats.items():
            group, size = _group_of(part)
            padding = s["shard_numel"] - s["owned_numel"]
            assert s["master_bytes"] + s["adam_bytes"] == 12 * s["owned_numel"] + 4 * padding, (part, s)
            if not zero:
                assert s["owned_numel"] == numel[part]
                continue
            owned = torch.tensor([s["owned_numel"]])
            dist.all_reduce(owned, group=group)
            assert owned.item() == numel[part], f"{part}: every element owned exactly once"
            shard_sizes = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
            dist.all_gather(shard_sizes, torch.tensor([s["shard_numel"]]), group=group)
            assert len({t.item() for t in shard_sizes}) == 1, f"{part}: unequal shards {shard_sizes}"
            # padding: parameter alignment plus rounding each bucket up to a multiple of the group
            assert padding * size <= count[part] * (PARAM_ALIGNMENT + size), (part, padding)


def test_zero1_optimizer_bytes_per_rank_follow_the_formula():
    run_distributed(_memory_body, 4)


def _round_trip(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _state_body(rank, world):
    layout = dict(zero=True, dtype=torch.float16, initial_loss_scale=2.0**12, loss_scale_window=2, bucket_size=5_000)
    model, opt = build(2, (2, 2), **layout)
    train(model, opt, 2)
    saved = _round_trip(opt.state_dict())
    straight = train(model, opt, 2, first_step=2)
    straight_params = gather_full_state(model, model.layout)

    model, opt = build(2, (2, 2), **layout)  # fresh parameters: load_state_dict restores them from the masters
    opt.load_state_dict(saved)
    resumed = train(model, opt, 2, first_step=2)
    for got, want in zip(resumed.pop("bias"), straight.pop("bias"), strict=True):
        assert torch.equal(got, want), "expert biases differ after resuming"
    assert resumed == straight, (resumed, straight)
    for name, p in gather_full_state(model, model.layout).items():
        assert torch.equal(p, straight_params[name]), name

    for tp, eps, zero in ((1, (4, 2), True), (2, (2, 2), False)):  # another TP; ZeRO-1 off
        model, opt = build(tp, eps, **{**layout, "zero": zero})
        with pytest.raises(ValueError, match=r"the optimizer state is not this rank's: its owned \(name, range\)"):
            opt.load_state_dict(saved)


def test_sharded_state_resumes_bitwise_and_refuses_another_layout():
    run_distributed(_state_body, 4)
