"""The Adam implementation: apex ``FusedAdam`` (AdamW mode) on CUDA when apex is importable,
else ``torch.optim.AdamW`` fused, else its foreach path.  The choice is logged once per process.

All of them compute decoupled weight decay ``p -= lr * wd * p`` followed by the bias-corrected
Adam update, so they differ only by rounding.
"""

from __future__ import annotations

import logging

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


def build_adam(param_groups: list[dict], cfg: OptimizerConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """An AdamW over ``param_groups`` (each with its own ``weight_decay``); returns it and its name."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if HAVE_APEX and device.type == "cuda":
        optimizer, kind = ApexFusedAdam(param_groups, adam_w_mode=True, **kwargs), "apex FusedAdam (adam_w_mode)"
    else:
        try:
            optimizer, kind = torch.optim.AdamW(param_groups, fused=True, **kwargs), "torch.optim.AdamW (fused)"
        except RuntimeError:  # no fused kernel for this device
            optimizer, kind = torch.optim.AdamW(param_groups, foreach=True, **kwargs), "torch.optim.AdamW (foreach)"
    _log_once(kind)
    return optimizer, kind
