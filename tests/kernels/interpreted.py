"""How the kernel tests run megamoe's Triton kernels: on CUDA where there is one, else on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets
before anything imports Triton).  The interpreter rounds fp32 to bf16 by truncation where
a GPU rounds to nearest, so bf16 results are compared to within bf16 rounding.

``kernel_module(name)`` at a test module's import skips the module when Triton (the ``gpu``
extra) is not installed.  ``fused_here()`` makes ``megamoe.kernels.use_fused`` say yes on this
device, as it does on CUDA, so that the model's own code takes the fused path.
"""

from __future__ import annotations

import importlib
import os
from unittest import mock

import pytest
import torch

from megamoe import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# one bf16 rounding of the fused result (fp32 inside) against the plain ops' (bf16 intermediates)
BF16 = dict(rtol=2e-2, atol=2e-2)
FP32 = dict(rtol=1e-5, atol=1e-6)


def kernel_module(name: str):
    """``megamoe.kernels.<name>``, its kernels interpreted when there is no GPU."""
    pytest.importorskip("triton", reason="Triton is not installed (the gpu extra: pip install -e '.[gpu]')")
    assert DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", \
        "without a GPU the kernels need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)"
    return importlib.import_module(f"megamoe.kernels.{name}")


def fused_here():
    """A context in which ``kernels.use_fused(enabled, x)`` is ``enabled``."""
    return mock.patch.object(kernels, "use_fused", lambda enabled, x: enabled)
