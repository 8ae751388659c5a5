"""Rotary position embedding, in the rotate-half convention (as HF Llama/Mixtral use it,
so exported weights need no permutation)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``[seq, head_dim]``; cached per (length, device, dtype)."""
        if self._cache is None or self._cache[:3] != (seq_len, device, dtype):
            positions = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            angles = torch.cat([freqs, freqs], dim=-1)
            self._cache = (seq_len, device, dtype, angles.cos().to(dtype), angles.sin().to(dtype))
        return self._cache[3], self._cache[4]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [b, heads, seq, head_dim]`` rotated by position."""
    return x * cos + _rotate_half(x) * sin
