"""Splitting the fused QKV projection into heads: the same views forward, and the backward's
gradient of the projection is bitwise autograd's (which stacks q, k, v and copies the stack),
for multi-head (r = 1) and grouped-query (r = 2) attention."""

import pytest
import torch

from megamoe.model.attention import _SplitHeads


def _plain(x, r, groups, d):
    b, s, _ = x.shape
    qkv = x.view(b, s, r + 2, groups, d)
    if r == 1:
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = qkv[:, :, :r].permute(0, 3, 2, 1, 4).reshape(b, groups * r, s, d)
    return q, qkv[:, :, r].transpose(1, 2), qkv[:, :, r + 1].transpose(1, 2)


@pytest.mark.parametrize("r", [1, 2])
def test_split_heads_matches_autograd_of_the_views(r):
    b, s, groups, d = 2, 5, 3, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, (r + 2) * groups * d, generator=gen).to(torch.bfloat16).requires_grad_()
    ours, plain = _SplitHeads.apply(x, r, groups, d), _plain(x, r, groups, d)
    grads = [torch.randn(t.shape, generator=gen).to(torch.bfloat16) for t in plain]
    for o, p in zip(ours, plain):
        assert torch.equal(o, p) and o.stride() == p.stride()
    (got,) = torch.autograd.grad(ours, x, grads)
    (want,) = torch.autograd.grad(plain, x, grads)
    assert torch.equal(got, want)
