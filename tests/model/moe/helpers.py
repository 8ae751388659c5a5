"""Shared pieces of the MoE parity tests: the gradient reduction rule and the comparison."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import param_meta
from megamoe.parallel.state import get_parallel_state

RTOL = 1e-5


def reduced_full_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Apply the reduction rule of the gradient-math note with plain all-reduces, then gather.

    Dense parameter: sum over DP / DP.  Expert parameter: sum over its EDP group / DP (not EDP:
    the all-to-all backward already summed the tokens of the whole EP group into it).
    """
    state = get_parallel_state()
    for param in module.parameters():
        meta = param_meta(param)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        group = state.experts(meta.expert_parallel_size).edp_group if meta.is_expert else state.dp_group
        dist.all_reduce(param.grad, group=group)
        param.grad /= state.dp_size
    return gather_full_state(module, grads=True)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """``got`` equals ``want`` to ``rtol`` relative, elementwise, with an absolute floor of
    ``rtol`` times the tensor's largest magnitude (entries near zero carry fp32 rounding of
    the large ones)."""
    want = want.detach().double()
    floor = rtol * max(want.abs().max().item(), 1e-30) if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=floor, msg=lambda m: f"{what}: {m}")
