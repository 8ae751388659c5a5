"""The trainer settles the fused kernels' start-up check at setup on every rank at once
(``megamoe.kernels.guard.agree``): with one kernel failing on rank 1 only, both ranks train with
it off, and rank 0 alone prints its one line, naming the kernel, the rank and
``--no-fused-kernels``.  The kernels run on CPU through Triton's interpreter, as in
``tests/kernels``."""

import contextlib
import io
import os

import pytest

from tests.fixtures import TINY_MOE
from tests.harness import run_distributed

pytest.importorskip("triton", reason="Triton is not installed (the gpu extra: pip install -e '.[gpu]')")


def _train(rank, world):
    from megamoe.kernels import guard
    from megamoe.training.arguments import parse_config
    from megamoe.training.trainer import pretrain
    from tests.kernels.interpreted import DEVICE, break_kernel, guarded_here

    os.environ["WORLD_SIZE"] = str(world)
    with pytest.MonkeyPatch.context() as monkeypatch:
        guarded_here(monkeypatch)
        if rank == 1:
            break_kernel(monkeypatch, "swiglu", "raises")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pretrain(parse_config(TINY_MOE + ["--train-iters", "1"]))
        return guard._verdicts.get(str(DEVICE)), out.getvalue().splitlines()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the harness runs gloo on CPU tensors")
def test_a_kernel_failing_on_one_rank_is_off_on_every_rank_with_one_line_from_rank_0():
    (verdict0, out0), (verdict1, out1) = run_distributed(_train, 2, timeout=300)
    assert verdict0 == verdict1 and verdict0["swiglu"] and not any(v for k, v in verdict0.items() if k != "swiglu")
    off = [line for line in out0 if "is off" in line]
    assert len(off) == 1 and "fused kernel swiglu is off" in off[0] and "rank 1's device" in off[0], off
    assert "RuntimeError: simulated launch failure of swiglu" in off[0] and "--no-fused-kernels" in off[0]
    assert not any("fused kernel" in line for line in out1), "rank 0 logs the verdict"

