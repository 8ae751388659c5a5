"""The Adam implementation: apex ``FusedAdam`` (AdamW mode) on CUDA when apex is importable,
else ``torch.optim.AdamW`` fused where it runs on the device, else its foreach path.  The choice
is logged once per process.

All of them compute decoupled weight decay ``p -= lr * wd * p`` followed by the bias-corrected
Adam update, so they differ only by rounding.

Clipping can ride inside torch's fused AdamW: its ``step`` divides each gradient by the tensor
in ``optimizer.grad_scale`` as it reads it (the hook ``torch.amp.GradScaler`` uses), which saves
a pass over the gradients.  That attribute is not documented API, so it is used only where a
one-step probe on the device shows fused AdamW reads it and divides by it
(``fused_adamw_support``); elsewhere the optimizer clips the gradients itself.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from megamoe.optim.config import OptimizerConfig

try:  # NVIDIA apex is optional and never installed from PyPI.
    from apex.optimizers import FusedAdam as ApexFusedAdam

    HAVE_APEX = True
except ImportError:
    HAVE_APEX = False

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(kind: str) -> None:
    if kind not in _logged:
        _logged.add(kind)
        logger.info("optimizer: %s", kind)


@dataclass(frozen=True)
class FusedSupport:
    runs: bool  # fused AdamW steps on the device and gives the Adam update
    applies_grad_scale: bool  # ... and divides every gradient by ``optimizer.grad_scale``


@functools.cache
def fused_adamw_support(device: torch.device, optimizer_class: type = torch.optim.AdamW) -> FusedSupport:
    """Probe ``optimizer_class(..., fused=True)`` on ``device`` with one step of a 1-element
    parameter, once per (device, class).

    With ``lr=1, betas=(0, 0), eps=1`` one step moves ``p = 0`` to ``-g / (|g| + 1)``: gradient 2
    gives ``-2/3``, and gradient 2 read through ``grad_scale = 2`` gives ``-1/2``.  Adam is
    otherwise invariant to the gradient's scale, hence the large eps.
    """

    def one_step(grad_scale: float | None) -> float:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.full_like(p, 2.0)
        opt = optimizer_class([p], lr=1.0, betas=(0.0, 0.0), eps=1.0, weight_decay=0.0, fused=True)
        if grad_scale is not None:
            opt.grad_scale = torch.tensor(grad_scale, device=device)
        opt.step()
        return p.item()

    try:
        runs = abs(one_step(None) + 2.0 / 3.0) <= 1e-6
    except (RuntimeError, NotImplementedError):  # no fused kernel for this device (or no data: meta)
        return FusedSupport(runs=False, applies_grad_scale=False)
    try:
        scaled = abs(one_step(2.0) + 0.5) <= 1e-6
    except (RuntimeError, AssertionError):  # torch raises AssertionError where grad_scale is not supported
        scaled = False
    return FusedSupport(runs=runs, applies_grad_scale=runs and scaled)


@dataclass(frozen=True)
class Adam:
    optimizer: torch.optim.Optimizer
    kind: str  # for logs and benchmarks
    applies_grad_scale: bool  # step() divides every gradient by ``optimizer.grad_scale`` when it is set


def build_adam(param_groups: list[dict], cfg: OptimizerConfig, device: torch.device) -> Adam:
    """An AdamW over ``param_groups`` (each with its own ``weight_decay``) on ``device``."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if HAVE_APEX and device.type == "cuda":
        adam = Adam(ApexFusedAdam(param_groups, adam_w_mode=True, **kwargs), "apex FusedAdam (adam_w_mode)", False)
    else:
        support = fused_adamw_support(device)
        if support.runs:
            optimizer = torch.optim.AdamW(param_groups, fused=True, **kwargs)
            adam = Adam(optimizer, "torch.optim.AdamW (fused)", support.applies_grad_scale)
        else:
            adam = Adam(torch.optim.AdamW(param_groups, foreach=True, **kwargs), "torch.optim.AdamW (foreach)", False)
    _log_once(adam.kind)
    return adam
