"""The fused SwiGLU kernel computes what the plain SwiGLU (``_SwiGLU``) computes, forward and
backward, in fp32 and bf16, for widths that are not a power of two and for more than one block;
it passes torch's custom-op checks (fake tensors, autograd registration, AOT tracing)."""

import pytest
import torch

from megamoe.model.mlp import activation
from tests.kernels.interpreted import BF16, DEVICE, FP32, fused_here, kernel_module

swiglu = kernel_module("swiglu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f", [24, 1100])
def test_fused_swiglu_matches_the_plain_one(dtype, f):
    g = torch.Generator().manual_seed(f)
    h = (torch.randn(3, 5, 2 * f, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(3, 5, f, generator=g).to(DEVICE, dtype)
    plain = activation(h, True, False)
    (plain_grad,) = torch.autograd.grad(plain, h, grad_out)
    with fused_here():
        fused = activation(h, True, True)
    (fused_grad,) = torch.autograd.grad(fused, h, grad_out)
    assert fused.grad_fn.name() != plain.grad_fn.name(), "the fused path did not run"
    tol = FP32 if dtype == torch.float32 else BF16
    assert fused.dtype == fused_grad.dtype == dtype
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fused_grad, plain_grad, **tol)


def test_fused_swiglu_passes_the_custom_op_checks():
    h = torch.randn(4, 2 * 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.megamoe.swiglu, (h,))
    torch.library.opcheck(torch.ops.megamoe.swiglu_backward, (torch.randn(4, 24, device=DEVICE), h.detach()))
