"""Dense MLP, tensor-parallel: column-parallel fc1 (SwiGLU: gate and up fused as ``[2, ffn/TP, h]``),
row-parallel fc2.  x ``[..., h]`` -> ``[..., h]`` summed over TP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe import kernels
from megamoe.model.config import ModelConfig
from megamoe.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamoe.parallel.state import ParallelState


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` on ``h = [..., gate f | up f]``, saving only ``h`` for backward.

    Autograd of the composed ops would also keep ``silu(gate)`` alive (half of ``h`` again: 5.9 GB
    over the 16 MoE layers of moe-1b-4e) and concatenate the two input gradients in an extra pass;
    here both are written straight into one ``[..., 2f]`` gradient.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_out, F.silu(gate), out=grad_up)
        torch.mul(grad_out, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_h


def activation(fc1_out: torch.Tensor, swiglu: bool, fused: bool = True) -> torch.Tensor:
    """SwiGLU on ``[..., 2 * f]`` laid out as (gate, up), or GeLU on ``[..., f]``; SwiGLU in one
    Triton kernel each way where ``kernels.use_fused("swiglu", fused, fc1_out)``."""
    if swiglu:
        if kernels.use_fused("swiglu", fused, fc1_out):
            from megamoe.kernels.swiglu import swiglu as fused_swiglu

            return fused_swiglu(fc1_out)
        return _SwiGLU.apply(fc1_out)
    return F.gelu(fc1_out)


class MLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layout: ParallelState,
        *,
        ffn_hidden_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        fused_kernels: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        ffn = ffn_hidden_size or config.ffn_hidden_size
        self.swiglu = config.swiglu
        self.fused_kernels = fused_kernels
        self.fc1 = ColumnParallelLinear(
            config.hidden_size,
            (2, ffn) if config.swiglu else ffn,
            layout=layout,
            bias=config.add_bias_linear,
            init_std=config.init_method_std,
            dtype=dtype,
            device=device,
        )
        self.fc2 = RowParallelLinear(
            ffn,
            config.hidden_size,
            layout=layout,
            bias=config.add_bias_linear,
            init_std=config.output_layer_init_std,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.fc1(x), self.swiglu, self.fused_kernels))
