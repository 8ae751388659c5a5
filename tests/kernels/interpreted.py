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
