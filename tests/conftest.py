"""Session-wide: the harness's kept worker processes stop when the session ends; without a GPU,
megamoe's Triton kernels (tests/kernels) run through Triton's interpreter, which has to be on
before Triton is first imported by anyone (its own ``@triton.jit`` functions are made then) and
changes nothing else on CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.harness import close_workers


@pytest.fixture(scope="session", autouse=True)
def _stop_harness_workers():
    yield
    close_workers()
