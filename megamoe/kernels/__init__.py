"""Fused GPU kernels (Triton), an optional extra: ``pip install megamoe[gpu]``.

Each kernel module here imports Triton at its top and is imported only where ``use_fused`` says
yes, so that the CPU path never needs Triton.  A kernel is a ``torch.library.custom_op`` with a
fake (meta) implementation and an autograd formula: torch.compile traces around it as one op, and
``bench/bench_step_traffic.py`` counts it as one kernel reading its inputs and writing its outputs.

The kernels compute in fp32 and round once as they store; the plain PyTorch ops they replace
round some intermediates to the activation dtype, so in bf16 the two paths agree to bf16
rounding, not bit for bit (fp32: to fp32 rounding).  ``tests/kernels`` checks both against the
plain path on CPU, through Triton's interpreter; on a device, ``guard`` checks each kernel against
the plain path once before its first use there, and a kernel that fails runs as the plain ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import lru_cache

import torch

# The kernels (the modules of this package) that ``use_fused`` decides for.
KERNELS = ("swiglu", "rotary", "cross_entropy", "moe")
# The device types on which ``use_fused`` may say yes.  Tests add "cpu", where Triton's
# interpreter runs the kernels (``TRITON_INTERPRET=1``), to put the guard itself under test.
DEVICE_TYPES = ("cuda",)
_forced = 0


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton can be imported (the ``gpu`` extra is installed)."""
    return importlib.util.find_spec("triton") is not None


def use_fused(kernel: str, enabled: bool, x: torch.Tensor) -> bool:
    """The one decision whether fused ``kernel`` (one of ``KERNELS``) runs on ``x``: ``enabled``
    (``--no-fused-kernels`` turns it off), Triton installed, ``x`` on CUDA (``candidate``), and the
    kernel passed its check against the plain path on ``x``'s device (``guard.passes``; the first
    call for a device runs the checks).  Inside ``forced()``: ``enabled`` and Triton installed."""
    assert kernel in KERNELS, kernel
    if _forced:
        return enabled and available()
    if not candidate(enabled, x.device):
        return False
    from megamoe.kernels import guard

    return guard.passes(kernel, str(x.device))


def candidate(enabled: bool, device: torch.device) -> bool:
    """Whether the kernels may run on ``device`` before the guard's verdict: ``enabled``, Triton
    installed, a device type of ``DEVICE_TYPES`` (the trainer settles the verdict at setup then)."""
    return enabled and available() and device.type in DEVICE_TYPES


@contextlib.contextmanager
def forced():
    """A context in which ``use_fused`` skips the device and the guard: how the guard runs a
    kernel it is checking, and how the tests run the kernels through Triton's interpreter."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1
