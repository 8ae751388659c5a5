"""The start-up guard (``megamoe.kernels.guard``) accepts the real kernels; a kernel made wrong
(its result + 1e-2) or made to raise (as a failed compile or launch) is turned off with one log
line naming it, its error or largest difference and ``--no-fused-kernels``, while the others stay
on, and its public function then computes exactly the plain path; the checks run once per process
and device, and never with ``--no-fused-kernels``; under torch.compile the first check runs while tracing and the graph holds the verdict;
ranks settle on one verdict (``agree``): a kernel one rank failed is off on every rank."""

import logging

import pytest
import torch

from megamoe import kernels
from megamoe.kernels import guard
from megamoe.kernels.cases import CASES
from megamoe.model.mlp import activation
from tests.harness import run_distributed
from tests.kernels.interpreted import DEVICE, break_kernel, guarded_here, kernel_module

for _name in kernels.KERNELS:
    kernel_module(_name)


def _verdict() -> dict[str, bool]:
    """``use_fused`` for every kernel on a tensor of this device."""
    x = torch.zeros(1, device=DEVICE)
    return {kernel: kernels.use_fused(kernel, True, x) for kernel in kernels.KERNELS}


def _off_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == guard.__name__ and r.levelno == logging.WARNING]


def test_the_guard_passes_the_real_kernels(monkeypatch, caplog):
    guarded_here(monkeypatch)
    assert _verdict() == dict.fromkeys(kernels.KERNELS, True)
    assert not _off_lines(caplog)


@pytest.mark.parametrize("kernel,how", [("swiglu", "wrong"), ("moe", "raises")])
def test_a_failing_kernel_is_off_with_one_line_and_the_others_stay_on(monkeypatch, caplog, kernel, how):
    guarded_here(monkeypatch)
    break_kernel(monkeypatch, kernel, how)
    assert _verdict() == {k: k != kernel for k in kernels.KERNELS}
    (line,) = _off_lines(caplog)
    assert f"fused kernel {kernel} is off" in line and "--no-fused-kernels" in line and "\n" not in line
    assert ("RuntimeError: simulated launch failure of moe" in line if how == "raises"
            else "max |fused - plain| 0.01" in line), line
    case = CASES[kernel]
    inputs = case.inputs(DEVICE, torch.float32, **case.check)
    plain, taken = case.run(inputs, False), case.run(inputs, True)  # fused asked for, the guard says no
    for output, value in plain.items():
        assert torch.equal(taken[output], value), output


def test_the_checks_run_once_per_process_and_device_and_never_with_no_fused_kernels(monkeypatch):
    guarded_here(monkeypatch)
    runs = []
    real = guard.check_kernel
    monkeypatch.setattr(guard, "check_kernel", lambda kernel, device: runs.append(kernel) or real(kernel, device))
    x = torch.zeros(1, device=DEVICE)
    assert not any(kernels.use_fused(k, False, x) or kernels.candidate(False, DEVICE) for k in kernels.KERNELS)
    assert not runs, "--no-fused-kernels runs no check"
    for _ in range(3):
        _verdict()
        activation(torch.randn(2, 8, device=DEVICE), True)
    assert runs == list(kernels.KERNELS)


def test_under_torch_compile_the_first_check_runs_while_tracing(monkeypatch):
    guarded_here(monkeypatch)
    h = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda h: activation(h, True), fullgraph=True, backend=backend)(h)
    assert guard._verdicts[str(DEVICE)] == dict.fromkeys(kernels.KERNELS)
    assert len(graphs) == 1 and "megamoe.swiglu" in graphs[0], graphs
    torch.testing.assert_close(compiled, activation(h, True, False))
    (grad,) = torch.autograd.grad(compiled.sum(), h)
    torch.testing.assert_close(grad, torch.autograd.grad(activation(h, True, False).sum(), h)[0])


def _agree_body(rank, world):
    from unittest import mock

    for name in kernels.KERNELS:
        kernel_module(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        guarded_here(monkeypatch)
        if rank == 1:
            break_kernel(monkeypatch, "rotary", "wrong")
        with mock.patch.object(guard.logger, "warning") as warned:
            lines = guard.agree(DEVICE)
            verdict = _verdict()
        return lines, verdict, warned.call_count


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the harness runs gloo on CPU tensors")
def test_ranks_agree_a_kernel_one_rank_failed_is_off_on_every_rank():
    (lines0, verdict0, warned0), (lines1, verdict1, warned1) = run_distributed(_agree_body, 2)
    assert verdict0 == verdict1 == {k: k != "rotary" for k in kernels.KERNELS}
    assert lines0 == lines1 and warned0 == warned1 == 0, "agree's lines are the trainer's to log, on rank 0"
    off, passed = lines0
    assert "fused kernel rotary is off" in off and "rank 1's device" in off and "--no-fused-kernels" in off
    assert passed.endswith("swiglu, cross_entropy, moe passed"), passed
