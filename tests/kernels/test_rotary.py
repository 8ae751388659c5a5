"""The fused RoPE kernel computes what ``megamoe.model.rope``'s plain rotation computes, forward
and backward, in fp32 and bf16, on the strided q view the attention's QKV split makes and with
YaRN-scaled tables, writing position-major output; it passes torch's custom-op checks."""

import pytest
import torch

from megamoe.model.rope import RotaryEmbedding, apply_rotary
from tests.kernels.interpreted import BF16, DEVICE, FP32, fused_here, kernel_module
from tests.tiny_moe import tiny_config

kernel_module("rotary")
BATCH, SEQ, HEADS, DIM = 2, 20, 3, 12  # 20 positions: more than one block of 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
def test_fused_rotary_matches_the_plain_one(dtype, rope_type):
    yarn = dict(rotary_scaling_factor=4.0, original_max_position_embeddings=8) if rope_type == "yarn" else {}
    config = tiny_config(rope_type=rope_type, **yarn)
    cos, sin = RotaryEmbedding(DIM, config).cos_sin(SEQ, DEVICE, dtype)
    g = torch.Generator().manual_seed(0)
    # [b, s, heads, (q, k, v), d] -> q [b, heads, s, d]: a view whose positions are not adjacent
    qkv = torch.randn(BATCH, SEQ, HEADS, 3, DIM, generator=g).to(DEVICE, dtype).requires_grad_()
    q = qkv[:, :, :, 0].transpose(1, 2)
    grad_out = torch.randn(BATCH, HEADS, SEQ, DIM, generator=g).to(DEVICE, dtype)
    plain = apply_rotary(q, cos, sin, fused=False)
    (plain_grad,) = torch.autograd.grad(plain, qkv, grad_out)
    with fused_here():
        fused = apply_rotary(q, cos, sin, fused=True)
    (fused_grad,) = torch.autograd.grad(fused, qkv, grad_out)
    assert fused.grad_fn.name() != plain.grad_fn.name(), "the fused path did not run"
    assert fused.transpose(1, 2).is_contiguous(), "stored position-major, as the projection lays q out"
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fused_grad, plain_grad, **tol)


def test_fused_rotary_passes_the_custom_op_checks():
    x = torch.randn(1, 2, 5, DIM, device=DEVICE, requires_grad=True)
    angles = torch.randn(5, DIM // 2, device=DEVICE).repeat(1, 2)
    torch.library.opcheck(torch.ops.megamoe.rotary, (x, angles.cos(), angles.sin(), False))
