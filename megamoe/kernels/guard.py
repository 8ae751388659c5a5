"""The fused kernels checked against the plain PyTorch path on a device before they first run there.

The kernels were validated only in Triton's interpreter on CPU (``tests/kernels``); a GPU's
compiler, launch and arithmetic are not the interpreter's.  So ``passes(kernel, device)``, which
``megamoe.kernels.use_fused`` consults, first runs every kernel's case on the device (once per
process and device): tiny inputs (``Case.check``), forward and backward, in fp32 and bf16, through the same public
functions the model calls, with ``fused`` off and then forced on, compared with the tolerances of
``tests/kernels`` (``TOLERANCES``).  A kernel that raises (compile, launch, an asynchronous CUDA
error, caught by a synchronize) or differs beyond them is off for the run: the plain ops run
instead, and one line naming the kernel, the error or the largest difference, and
``--no-fused-kernels`` is logged.  The cases (``megamoe.kernels.cases``) draw from their own
generators: a run's numbers do not depend on whether the check ran.

Every rank must take the same path (TP ranks computing different numerics would disagree), so the
trainer calls ``agree`` at setup, where every rank is in step: a collective in which each rank
checks its own device and a kernel is off on every rank if any rank failed it; only rank 0 logs,
one line per kernel, naming a rank that failed it (a per-rank log would repeat the same line on
every GPU of a homogeneous job).  Outside the trainer (one process: a bench, generation) ``passes``
checks lazily on first use and logs from that process.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from megamoe import kernels
from megamoe.kernels.cases import CASES, Inputs, Outputs

logger = logging.getLogger(__name__)

# One bf16 rounding of the fused result (fp32 inside) against the plain ops' (bf16 intermediates);
# fp32 to fp32 rounding.  ``SUMMED_BF16``: a GEMM of a bf16 gradient, whose elements' last-bit
# differences add up over the contraction (the chunked LM head's input and weight gradients).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SUMMED_BF16 = dict(rtol=2e-2, atol=6e-2)

_verdicts: dict[str, dict[str, str | None]] = {}  # device -> kernel -> why it is off (None: on)


def run_both(kernel: str, inputs: Inputs) -> tuple[Outputs, Outputs]:
    """``kernel``'s case run on ``inputs`` plain, then fused (forced on: the guard's verdict aside)."""
    plain = CASES[kernel].run(inputs, False)
    with kernels.forced():
        fused = CASES[kernel].run(inputs, True)
    return plain, fused


def _tolerance(dtype: torch.dtype, output: str) -> dict:
    return SUMMED_BF16 if dtype == torch.bfloat16 and output.startswith("chunked grad") else TOLERANCES[dtype]


def _largest(f: torch.Tensor, p: torch.Tensor) -> float:
    return (f.double() - p.double()).abs().nan_to_num(float("inf")).max().item() if p.numel() else 0.0


def max_difference(plain: Outputs, fused: Outputs) -> float:
    """The largest ``|fused - plain|`` over every output (inf where a NaN or inf appears)."""
    return max(_largest(fused[output], p) for output, p in plain.items())


def tolerance_used(plain: Outputs, fused: Outputs, dtype: torch.dtype) -> float:
    """The largest ``|fused - plain| / (atol + rtol |plain|)`` over every output's elements, with
    the tolerances of ``dtype``: at most 1 where ``difference`` finds none."""
    worst = 0.0
    for output, p in plain.items():
        tol = _tolerance(dtype, output)
        allowed = tol["atol"] + tol["rtol"] * p.double().abs()
        ratio = ((fused[output].double() - p.double()).abs() / allowed).nan_to_num(float("inf"))
        worst = max(worst, ratio.max().item() if p.numel() else 0.0)
    return worst


def difference(plain: Outputs, fused: Outputs, dtype: torch.dtype) -> str | None:
    """Why ``fused`` is not ``plain`` within the tolerances (the first output that differs), or None."""
    for output, p in plain.items():
        f, tol = fused[output], _tolerance(dtype, output)
        if f.dtype != p.dtype or f.shape != p.shape:
            return f"{output} is {f.dtype} {tuple(f.shape)}, the plain path's {p.dtype} {tuple(p.shape)}"
        try:
            torch.testing.assert_close(f, p, **tol)
        except AssertionError:
            return (f"{str(dtype).removeprefix('torch.')} {output}: max |fused - plain| {_largest(f, p):.3g}, beyond "
                    f"rtol {tol['rtol']:g} atol {tol['atol']:g}")
    return None


def check_kernel(kernel: str, device: torch.device) -> str | None:
    """Run ``kernel``'s case on ``device`` plain and fused, in fp32 and bf16; None if they agree,
    else why not (the exception, or the largest difference of the first output that differs)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    try:
        for dtype in TOLERANCES:
            plain, fused = run_both(kernel, CASES[kernel].inputs(device, dtype, **CASES[kernel].check))
            sync(device)  # an asynchronous launch error is this kernel's
            why = difference(plain, fused, dtype)
            if why is not None:
                return why
    except Exception as err:  # noqa: BLE001 - any failure of a kernel turns that kernel off
        first_line = next(iter(str(err).strip().splitlines()), "")
        return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return None


@contextlib.contextmanager
def checking(device: torch.device):
    """The context the checks run in, whatever the caller's (a model's forward under ``no_grad``):
    grad on, outside inference mode and autocast, ``device`` the current device."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        yield


def check(device: torch.device) -> dict[str, str | None]:
    """Every kernel's ``check_kernel`` on ``device`` (in ``checking``): kernel -> None (passed) or
    why it failed."""
    device = torch.device(device)
    with checking(device):
        return {kernel: check_kernel(kernel, device) for kernel in kernels.KERNELS}


def off_line(kernel: str, where: str, why: str) -> str:
    """The one log line of a kernel turned off."""
    return (f"fused kernel {kernel} is off for this run, the plain PyTorch ops run instead: it failed its start-up "
            f"check against them on {where}: {why} (the Triton kernels were validated only in Triton's interpreter "
            f"on CPU; --no-fused-kernels turns them all off and skips this check)")


def _on_line(verdict: dict[str, str | None], where: str) -> str:
    passed = [kernel for kernel, why in verdict.items() if why is None]
    return f"fused kernels checked against the plain path on {where}: {', '.join(passed) or 'none'} passed"


@torch.compiler.assume_constant_result
def passes(kernel: str, device: str) -> bool:
    """Whether fused ``kernel`` runs on ``device`` (``str(torch.device)``) in this process.  The first
    call for a device checks every kernel there (``check``) and logs a line per kernel that failed,
    unless ``agree`` has settled the device.  Under torch.compile the answer is a constant of the graph."""
    if device not in _verdicts:
        _verdicts[device] = verdict = check(torch.device(device))
        for name, why in verdict.items():
            if why is not None:
                logger.warning(off_line(name, device, why))
        logger.info(_on_line(verdict, device))
    return _verdicts[device][kernel] is None


def agree(device: torch.device, group: dist.ProcessGroup | None = None) -> list[str]:
    """Collective over ``group`` (default: the world): check this rank's ``device`` and settle every
    rank's verdict as the same one, a kernel on only where every rank passed it.  Returns the lines
    to log once (rank 0 logs them): a line per kernel that is off, naming the first rank that failed
    it and why, and one line of what passed; every rank returns the same lines."""
    device = torch.device(device)
    mine = {kernel: why for kernel, why in check(device).items() if why is not None}
    world = dist.get_world_size(group)
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    verdict: dict[str, str | None] = {}
    lines = []
    for kernel in kernels.KERNELS:
        failed = [(rank, failures[kernel]) for rank, failures in enumerate(gathered) if kernel in failures]
        verdict[kernel] = None
        if failed:
            rank, why = failed[0]
            others = f" (and {len(failed) - 1} more of the {world} ranks)" if len(failed) > 1 else ""
            verdict[kernel] = why
            lines.append(off_line(kernel, f"rank {rank}'s device{others}", why))
    _verdicts[str(device)] = verdict
    return [*lines, _on_line(verdict, f"the devices of {world} ranks")]

