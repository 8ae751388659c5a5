"""The expert GEMM: torch._grouped_mm and the per-expert fallback compute the same thing as a
loop over experts in fp64, forward and backward, empty experts included; the grouped path is
only taken where the tensors allow it."""

from __future__ import annotations

import itertools

import pytest
import torch

from megamoe.model.moe.experts import expert_linear, grouped_mm_supported


def _problem(counts, in_features, out_features, dtype=torch.float32):
    gen = torch.Generator().manual_seed(sum(counts) + in_features)
    x = torch.randn(sum(counts), in_features, generator=gen).to(dtype)
    w = torch.randn(len(counts), out_features, in_features, generator=gen).to(dtype)
    offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32)
    return x, w, offsets


def _loop_reference(x, w, counts):
    blocks = x.double().split(counts)
    return torch.cat([block @ w[e].double().t() for e, block in enumerate(blocks)])


@pytest.mark.parametrize("counts", [[5, 0, 7, 4], [0, 0, 9, 0], [3, 6, 0, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("grouped", [True, False])
def test_expert_linear_matches_a_loop_over_experts(counts, grouped):
    x, w, offsets = _problem(counts, 16, 12)
    assert grouped_mm_supported(x, w.transpose(-2, -1)) == hasattr(torch, "_grouped_mm")
    x.requires_grad_()
    w.requires_grad_()
    out = expert_linear(x, w, counts, offsets, grouped=grouped)
    x_ref = x.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    want = _loop_reference(x_ref, w_ref, counts)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(grad_out)
    want.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-6, atol=1e-6)
    for e, n in enumerate(counts):
        assert (w.grad[e].abs().sum() == 0) == (n == 0)


@pytest.mark.parametrize(
    "dtype,in_features,out_features",
    [(torch.float64, 16, 12), (torch.float32, 6, 12), (torch.float32, 16, 6), (torch.bfloat16, 12, 16)],
)
def test_unaligned_or_unsupported_tensors_fall_back_and_stay_correct(dtype, in_features, out_features):
    counts = [4, 0, 5]
    x, w, offsets = _problem(counts, in_features, out_features, dtype)
    assert not grouped_mm_supported(x, w.transpose(-2, -1))
    out = expert_linear(x, w, counts, offsets, grouped=True)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.double(), _loop_reference(x, w, counts), rtol=tolerance, atol=tolerance)


def test_bf16_with_16_byte_aligned_strides_takes_the_grouped_path():
    counts = [4, 0, 5]
    x, w, offsets = _problem(counts, 16, 24, torch.bfloat16)
    assert grouped_mm_supported(x, w.transpose(-2, -1)) == hasattr(torch, "_grouped_mm")
    grouped = expert_linear(x, w, counts, offsets, grouped=True)
    fallback = expert_linear(x, w, counts, offsets, grouped=False)
    want = _loop_reference(x, w, counts)
    torch.testing.assert_close(grouped.double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fallback.double(), want, rtol=2e-2, atol=2e-2)
