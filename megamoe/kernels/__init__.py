"""Fused GPU kernels (Triton), an optional extra: ``pip install megamoe[gpu]``.

Each kernel module here imports Triton at its top and is imported only where ``use_fused`` says
yes, so that the CPU path never needs Triton.  A kernel is a ``torch.library.custom_op`` with a
fake (meta) implementation and an autograd formula: torch.compile traces around it as one op, and
``bench/bench_step_traffic.py`` counts it as one kernel reading its inputs and writing its outputs.

The kernels compute in fp32 and round once as they store; the plain PyTorch ops they replace
round some intermediates to the activation dtype, so in bf16 the two paths agree to bf16
rounding, not bit for bit (fp32: to fp32 rounding).  ``tests/kernels`` checks both against the
plain path on CPU, through Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton can be imported (the ``gpu`` extra is installed)."""
    return importlib.util.find_spec("triton") is not None


def use_fused(enabled: bool, x: torch.Tensor) -> bool:
    """The one decision whether a fused kernel runs on ``x``: ``enabled`` (``--no-fused-kernels``
    turns it off), ``x`` on CUDA, and Triton installed."""
    return enabled and x.is_cuda and available()
