"""Shared pieces of the MoE parity tests: gradients reduced by the optimizer's rule, and the comparison."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.optim.grad_buffer import grad_reduction
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import param_meta

RTOL = 1e-5


def reduced_full_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Reduce every gradient as the optimizer does (``grad_reduction``: its group and scale),
    with plain all-reduces, then gather the full tensors."""
    state = module.layout
    for param in module.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        reduction = grad_reduction(param_meta(param), state)
        param.grad.mul_(reduction.scale)
        dist.all_reduce(param.grad, group=reduction.group)
    return gather_full_state(module, module.layout, grads=True)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """``got`` equals ``want`` to ``rtol`` relative, elementwise, with an absolute floor of
    ``rtol`` times the tensor's largest magnitude (entries near zero carry fp32 rounding of
    the large ones)."""
    want = want.detach().double()
    floor = rtol * max(want.abs().max().item(), 1e-30) if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=floor, msg=lambda m: f"{what}: {m}")
