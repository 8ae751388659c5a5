"""The buffer layout, ZeRO-1 ownership and the reduction rule, in one process (no collective runs:
only the layout is built and the backward hook exercised)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megamoe.optim.grad_buffer import PARAM_ALIGNMENT, GradBuffer, Reduction, grad_reduction
from megamoe.parallel.params import ParamMeta

SHAPES = [(7, 5), (130,), (3, 4, 9), (1,), (64, 2), (11,)]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(f"p{i}", nn.Parameter(torch.randn(s, generator=g).to(dtype))) for i, s in enumerate(SHAPES)]


def _buffer(rank: int, size: int, *, sharded: bool, bucket_size: int, dtype=torch.float32):
    reduction = Reduction("dp", group=None, size=size, rank=rank, scale=1.0 / size)
    return GradBuffer(_params(dtype), reduction, bucket_size=bucket_size, sharded=sharded)


@pytest.mark.parametrize("bucket_size", [1, 100, 10_000])
@pytest.mark.parametrize("size", [1, 3, 4])
def test_zero1_shards_partition_every_parameter_exactly_once(bucket_size, size):
    owners = {name: torch.zeros(p.numel(), dtype=torch.int64) for name, p in _params()}
    shard_numels = set()
    for rank in range(size):
        buf = _buffer(rank, size, sharded=True, bucket_size=bucket_size)
        shard_numels.add(buf.local_numel)
        for b in buf.buckets:
            assert (b.end - b.start) % size == 0 and b.shard_end - b.shard_start == (b.end - b.start) // size
            for r in b.params:
                assert r.start % PARAM_ALIGNMENT == 0 and b.start <= r.start < r.end <= b.end
        local = 0
        for piece in buf.pieces():
            owners[piece.name][piece.param_start : piece.param_end] += 1
            assert piece.local_start >= local, "pieces are ordered in the shard (padding may sit between)"
            local = piece.local_start + piece.numel
    assert len(shard_numels) == 1, "every rank of the group has the same shard size"
    for name, count in owners.items():
        assert torch.equal(count, torch.ones_like(count)), f"{name} ownership {count.tolist()}"


def test_without_zero1_a_rank_owns_every_parameter_whole_and_params_view_the_buffer():
    values = {name: p.detach().clone() for name, p in _params()}
    buf = _buffer(1, 4, sharded=False, bucket_size=100)
    pieces = buf.pieces()
    assert sorted(piece.name for piece in pieces) == sorted(values)
    for piece in pieces:
        assert (piece.param_start, piece.param_end) == (0, piece.param.numel())
        assert piece.param.data_ptr() == buf.data[piece.buffer_start :].data_ptr()
        assert torch.equal(piece.param, values[piece.name]), "values survive the move into the buffer"


def test_backward_accumulates_low_precision_grads_into_fp32_main_grads_and_frees_them():
    buf = _buffer(0, 1, sharded=False, bucket_size=10_000, dtype=torch.bfloat16)
    params = [r.param for b in buf.buckets for r in b.params]
    expected = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    for micro_batch in range(3):
        loss = sum(((i + 1 + micro_batch) * p.float()).sum() for i, p in enumerate(params))
        loss.backward()
        for i, p in enumerate(params):
            expected[i] += i + 1 + micro_batch
            assert p.grad is None
    for p, want in zip(params, expected):
        assert p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, want, rtol=0, atol=0)


def test_after_zero_grad_the_first_gradient_is_copied_and_a_param_without_one_is_zeroed_at_sync():
    """zero_grad does not write the buffer: the next step's first gradient overwrites the main
    grad, later micro-batches add to it, the sums are the bits of zero + add in fp32 (bf16
    gradients of several magnitudes), and a parameter no loss reached reads zero once reduced."""
    size = 1
    buf = GradBuffer(_params(torch.bfloat16), Reduction("dp", group=None, size=size, rank=0, scale=1.0),
                     bucket_size=100, sharded=False)
    params = [r.param for b in buf.buckets for r in b.params]
    g = torch.Generator().manual_seed(1)
    weights = [[torch.randn(p.shape, generator=g) * 10.0 ** (i % 5 - 2) for p in params] for i in range(3)]
    for step in range(2):
        buf.zero_grad()
        want = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
        reached = range(1 if step else 0, len(params))  # step 1: the loss does not reach params[0]
        for w in weights:
            sum((params[i].float() * w[i]).sum() for i in reached).backward()
            for i in reached:
                want[i] += w[i].to(torch.bfloat16).float()
        buf.finish_grad_sync()
        for p, expected in zip(params, want):
            assert torch.equal(p.main_grad, expected), "main grad differs from zero + the sum of the gradients"


def _fake_state(dp: int, ep: int):
    experts = SimpleNamespace(ep_size=ep, edp_group="edp", edp_size=dp // ep, edp_rank=0, etp_rank=0)
    return SimpleNamespace(
        dp_group="dp", dp_size=dp, dp_rank=0, tp_rank=0, sequence_parallel=False, experts=lambda e: experts
    )


def test_reduction_rule_dense_over_dp_experts_over_edp_both_divided_by_dp():
    state = _fake_state(dp=8, ep=4)
    dense = grad_reduction(ParamMeta(), state)
    assert (dense.group, dense.size, dense.scale) == ("dp", 8, 1 / 8)
    expert = grad_reduction(ParamMeta(expert_parallel_size=4), state)
    assert (expert.group, expert.size) == ("edp", 2)
    assert expert.scale == 1 / 8, "expert grads are divided by DP, not by EDP (DeepSpeed PR 5259)"


def test_a_dropped_buffer_is_freed_while_its_parameters_live_on():
    """The backward hooks a buffer puts on its parameters must not keep it alive: a model whose
    optimizer is dropped (or rebuilt) would otherwise hold every old fp32 gradient buffer and its
    process groups for the life of the process."""
    import gc
    import weakref

    params = _params()
    buf = GradBuffer(params, Reduction("dp", group=None, size=1, rank=0, scale=1.0), bucket_size=100, sharded=False)
    sum(p.sum() for _, p in params).backward()
    assert all(torch.equal(p.main_grad, torch.ones_like(p)) for _, p in params)
    dropped = weakref.ref(buf)
    del buf
    gc.collect()
    assert dropped() is None, "the parameters' hooks keep the gradient buffer alive"
    sum(p.sum() for _, p in params).backward()  # the orphaned hooks still run
