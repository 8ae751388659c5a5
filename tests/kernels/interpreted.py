"""How the kernel tests run megamoe's Triton kernels: on CUDA where there is one, else on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets
before anything imports Triton).  The interpreter rounds fp32 to bf16 by truncation where
a GPU rounds to nearest, so bf16 results are compared to within bf16 rounding.

``kernel_module(name)`` at a test module's import skips the module when Triton (the ``gpu``
extra) is not installed.  ``fused_here()`` makes ``megamoe.kernels.use_fused`` say yes on this
device without the start-up guard (``megamoe.kernels.guard``, tested in ``test_guard.py``), so
that the model's own code takes the fused path.  The tolerances are the guard's.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from megamoe import kernels
from megamoe.kernels.guard import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32, BF16 = TOLERANCES[torch.float32], TOLERANCES[torch.bfloat16]


def kernel_module(name: str):
    """``megamoe.kernels.<name>``, its kernels interpreted when there is no GPU."""
    pytest.importorskip("triton", reason="Triton is not installed (the gpu extra: pip install -e '.[gpu]')")
    assert DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", \
        "without a GPU the kernels need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)"
    return importlib.import_module(f"megamoe.kernels.{name}")


def fused_here():
    """A context in which ``kernels.use_fused(kernel, enabled, x)`` is ``enabled``."""
    return kernels.forced()


def guarded_here(monkeypatch):
    """Let ``use_fused`` ask the guard on this device too (through the interpreter on CPU), with
    no verdict yet: the next use of a kernel runs the checks."""
    from megamoe.kernels import guard

    monkeypatch.setattr(kernels, "DEVICE_TYPES", (*kernels.DEVICE_TYPES, DEVICE.type))
    monkeypatch.setattr(guard, "_verdicts", {})  # restored afterwards: no verdict leaks into other tests


# the function of each kernel module that ``break_kernel`` replaces (forward or backward)
BROKEN_PART = {"swiglu": "swiglu", "rotary": "rotary", "cross_entropy": "logits_grad", "moe": "combine"}


def break_kernel(monkeypatch, kernel: str, how: str) -> None:
    """Make fused ``kernel`` wrong (``how="wrong"``: its result + 1e-2) or fail (``"raises"``, as a
    compile or launch error would)."""
    module = kernel_module(kernel)
    real = getattr(module, BROKEN_PART[kernel])

    def wrong(*args):
        return real(*args) + 1e-2

    def raises(*args):
        raise RuntimeError(f"simulated launch failure of {kernel}\nsecond line")

    monkeypatch.setattr(module, BROKEN_PART[kernel], {"wrong": wrong, "raises": raises}[how])
