"""RoPE's fewer-pass kernel sequence gives the bits of the plain formula, forward and backward;
--rotary-seq-len-interpolation-factor divides the positions."""

import pytest
import torch

from megamoe.model.rope import apply_rotary


def _plain(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_gives_the_bits_of_x_cos_plus_rotate_half_sin_forward_and_backward(dtype):
    b, s, heads, d = 2, 32, 3, 64
    gen = torch.Generator().manual_seed(0)
    # q and k as attention takes them: strided views [b, heads, s, d] of the fused projection
    qkv = torch.randn(b, s, 3, heads, d, generator=gen).to(dtype).requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    angles = torch.rand(s, d // 2, generator=gen) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    grads = [torch.randn(b, heads, s, d, generator=gen).to(dtype) for _ in range(2)]
    ours = [apply_rotary(t, cos, sin, fused=False) for t in (q, k)]
    plain = [_plain(t, cos, sin) for t in (q, k)]
    for o, p in zip(ours, plain):
        assert torch.equal(o, p) and o.stride() == p.stride()
    (got,) = torch.autograd.grad(ours, qkv, grads)
    (want,) = torch.autograd.grad(plain, qkv, grads)
    assert torch.equal(got, want)


def test_rotary_seq_len_interpolation_factor_divides_the_positions():
    """--rotary-seq-len-interpolation-factor N (Megatron's position interpolation): position p is
    rotated as position p / N."""
    from megamoe.model.config import ModelConfig
    from megamoe.model.rope import RotaryEmbedding

    def table(factor, length):
        config = ModelConfig(vocab_size=16, rotary_seq_len_interpolation_factor=factor)
        return RotaryEmbedding(8, config).cos_sin(length, torch.device("cpu"), torch.float32)

    cos1, sin1 = table(None, 8)
    cos2, sin2 = table(2, 16)
    torch.testing.assert_close(cos2[::2], cos1)
    torch.testing.assert_close(sin2[::2], sin1)
    assert not torch.allclose(cos2[1], cos1[1])
    assert torch.equal(table(1, 8)[0], cos1)
