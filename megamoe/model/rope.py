"""Rotary position embedding, in the rotate-half convention (as HF Llama/Mixtral use it,
so exported weights need no permutation), plain or YaRN-scaled (``--rope-type yarn``).

YaRN (Peng et al. 2023), with factor ``f`` (``--rotary-scaling-factor``) and the trained context
``L`` (``--original-max-position-embeddings``): frequency ``i`` of a ``dim``-wide rotation blends
the original ``1 / base^(2i/dim)`` (kept for the fast frequencies, more than ``--beta-fast``
rotations over ``L``) with the interpolated ``1 / (f base^(2i/dim))`` (taken for the slow ones,
fewer than ``--beta-slow`` rotations), linearly in between; the correction range is rounded
outwards to whole dims, as transformers and Megatron do.  cos and sin are multiplied by
``mscale(f, --mscale) / mscale(f, --mscale-all-dim)``, where ``mscale(f, m) = 1 + 0.1 m ln f``
(1 for ``f <= 1``); multi-latent attention also multiplies its softmax scale by
``mscale(f, --mscale-all-dim)^2`` (``softmax_mscale``).  With ``f = 1`` YaRN is plain RoPE.

``apply_rotary`` computes exactly what ``x * cos + cat(-x2, x1) * sin`` computes (halves ``x1,
x2``), rounding included (each product rounded to x's dtype, then the sum), in fewer passes: the
rotated copy of ``x`` is never made, the second products are written into one buffer by halves,
and the backward (the rotation by minus the angle) is the same three passes instead of
autograd's chain through ``cat``, ``neg`` and ``chunk``.  On CUDA, ``megamoe.kernels.rotary`` does
each direction in one pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe import kernels
from megamoe.model.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature ``1 + 0.1 mscale ln(factor)`` (1 when ``factor <= 1``)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_mscale(config: ModelConfig) -> float:
    """The factor MLA multiplies its softmax scale by: ``mscale(f, --mscale-all-dim)^2`` under YaRN, else 1."""
    if config.rope_type != "yarn":
        return 1.0
    return yarn_mscale(config.rotary_scaling_factor, config.mscale_all_dim) ** 2


def _correction_dim(rotations: float, dim: int, base: float, context: int) -> float:
    """The (fractional) dim whose frequency turns ``rotations`` times over ``context`` positions."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, config: ModelConfig) -> torch.Tensor:
    """``[dim / 2]`` fp32 inverse frequencies of YaRN (module docstring)."""
    factor = config.rotary_scaling_factor
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    interpolated = extrapolated / factor
    context = config.original_max_position_embeddings
    low = max(math.floor(_correction_dim(config.beta_fast, dim, base, context)), 0)
    high = min(math.ceil(_correction_dim(config.beta_slow, dim, base, context)), dim - 1)
    if low == high:
        high += 0.001  # a one-dim range: a step instead of a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: the original frequency, 0: the interpolated one
    return interpolated * (1.0 - keep) + extrapolated * keep


class RotaryEmbedding(nn.Module):
    """cos/sin tables of a ``dim``-wide rotation (``dim`` even), plain or YaRN by ``config.rope_type``."""

    def __init__(self, dim: int, config: ModelConfig) -> None:
        super().__init__()
        base = config.rotary_base
        if config.rope_type == "yarn":
            inv_freq = yarn_inv_freq(dim, base, config)
            factor = config.rotary_scaling_factor
            self.scale = yarn_mscale(factor, config.mscale) / yarn_mscale(factor, config.mscale_all_dim)
        else:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.scale = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interpolation_factor = config.rotary_seq_len_interpolation_factor or 1
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``[seq, dim]`` (times the YaRN scale); cached per (length, device, dtype)."""
        if self._cache is None or self._cache[:3] != (seq_len, device, dtype):
            positions = torch.arange(seq_len, device=device, dtype=torch.float32) / self.interpolation_factor
            freqs = torch.outer(positions, self.inv_freq.to(device))
            angles = torch.cat([freqs, freqs], dim=-1)
            cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
            self._cache = (seq_len, device, dtype, cos.to(dtype), sin.to(dtype))
        return self._cache[3], self._cache[4]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x * cos + [-x2 sin1, x1 sin2]`` (``inverse``: ``x * cos + [x2 sin2, -x1 sin1]``), each
    product rounded to x's dtype before the sum."""
    m = x.shape[-1] // 2
    out = torch.mul(x, cos)
    rotated = torch.empty_like(out)
    x1, x2 = x[..., :m], x[..., m:]
    sin1, sin2 = sin[..., :m], sin[..., m:]
    if inverse:
        torch.mul(x2, sin2, out=rotated[..., :m])
        torch.mul(x1, sin1, out=rotated[..., m:])
        out[..., :m].add_(rotated[..., :m])
        out[..., m:].sub_(rotated[..., m:])
    else:
        torch.mul(x2, sin1, out=rotated[..., :m])
        torch.mul(x1, sin2, out=rotated[..., m:])
        out[..., :m].sub_(rotated[..., :m])
        out[..., m:].add_(rotated[..., m:])
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """``x [b, heads, seq, dim]`` rotated by position (``cos, sin``: ``[seq, dim]``); in one Triton
    kernel each way where ``kernels.use_fused("rotary", fused, x)``."""
    if kernels.use_fused("rotary", fused, x):
        from megamoe.kernels.rotary import rotary

        return rotary(x, cos, sin)
    return _Rotary.apply(x, cos, sin)
