"""The fused kernels checked against the plain PyTorch path on a device before they first run there.

The kernels were validated only in Triton's interpreter on CPU (``tests/kernels``); a GPU's
compiler, launch and arithmetic are not the interpreter's.  So ``passes(kernel, device)``, which
``megamoe.kernels.use_fused`` consults, first runs every kernel's case on the device (once per
process and device): tiny inputs, forward and backward, in fp32 and bf16, through the same public
functions the model calls, with ``fused`` off and then forced on, compared with the tolerances of
``tests/kernels`` (``TOLERANCES``).  A kernel that raises (compile, launch, an asynchronous CUDA
error, caught by a synchronize) or differs beyond them is off for the run: the plain ops run
instead, and one line naming the kernel, the error or the largest difference, and
``--no-fused-kernels`` is logged.  The cases draw from their own generators: the run's random
state is untouched, so a run's numbers do not depend on whether the check ran.

Every rank must take the same path (TP ranks computing different numerics would disagree), so the
trainer calls ``agree`` at setup, where every rank is in step: a collective in which each rank
checks its own device and a kernel is off on every rank if any rank failed it; only rank 0 logs,
one line per kernel, naming a rank that failed it (a per-rank log would repeat the same line on
every GPU of a homogeneous job).  Outside the trainer (one process: a bench, generation) ``passes``
checks lazily on first use and logs from that process.

The cases import the plain paths (``megamoe.model``, ``megamoe.parallel``) inside themselves:
those modules import ``megamoe.kernels``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from megamoe import kernels

logger = logging.getLogger(__name__)

# One bf16 rounding of the fused result (fp32 inside) against the plain ops' (bf16 intermediates);
# fp32 to fp32 rounding.  ``SUMMED_BF16``: a GEMM of a bf16 gradient, whose elements' last-bit
# differences add up over the contraction (the chunked LM head's input and weight gradients).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SUMMED_BF16 = dict(rtol=2e-2, atol=6e-2)
_WIDE = 1100  # a width of more than one block (1024) of the SwiGLU and MoE kernels

_verdicts: dict[str, dict[str, str | None]] = {}  # device -> kernel -> why it is off (None: on)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _swiglu_case(device: torch.device, dtype: torch.dtype, fused: bool) -> dict[str, torch.Tensor]:
    from megamoe.model.mlp import activation

    g = torch.Generator().manual_seed(0)
    h = (_randn(g, 4, 2 * _WIDE) * 3).to(device, dtype).requires_grad_()
    grad = _randn(g, 4, _WIDE).to(device, dtype)
    out = activation(h, True, fused)
    return {"output": out, "grad h": torch.autograd.grad(out, h, grad)[0]}


def _rotary_case(device: torch.device, dtype: torch.dtype, fused: bool) -> dict[str, torch.Tensor]:
    from megamoe.model.rope import apply_rotary

    batch, seq, heads, dim = 2, 20, 3, 12  # 20 positions: more than one block of 16
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(seq, dim // 2, generator=g) * 6).repeat(1, 2)  # rotate-half tables
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    # [b, s, heads, (q, k, v), d] -> q [b, heads, s, d]: the strided view the QKV split makes
    qkv = _randn(g, batch, seq, heads, 3, dim).to(device, dtype).requires_grad_()
    grad = _randn(g, batch, heads, seq, dim).to(device, dtype)
    out = apply_rotary(qkv[:, :, :, 0].transpose(1, 2), cos, sin, fused=fused)
    return {"output": out, "grad x": torch.autograd.grad(out, qkv, grad)[0]}


def _cross_entropy_case(device: torch.device, dtype: torch.dtype, fused: bool) -> dict[str, torch.Tensor]:
    from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
    from megamoe.parallel.state import single_rank_layout

    tokens, hidden, vocab, padded, chunk = 14, 8, 37, 40, 4  # vocabulary padding; a chunk that does not divide
    g = torch.Generator().manual_seed(0)
    x = _randn(g, tokens, hidden).to(device, dtype)
    weight = (_randn(g, padded, hidden) * 2).to(device, dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    token_weights = torch.rand(tokens, generator=g).to(device)
    kw = dict(vocab_start=0, vocab_size=vocab, layout=single_rank_layout(), fused=fused)
    logits = (x @ weight.t()).requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target, **kw)
    (grad_logits,) = torch.autograd.grad((loss * token_weights).sum(), logits)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = chunked_linear_cross_entropy(xg, wg, target, token_weights, chunk_size=chunk, **kw)
    grad_x, grad_w = torch.autograd.grad(chunked * 3.0, (xg, wg))
    return {"loss": loss, "grad logits": grad_logits, "chunked loss": chunked, "chunked grad x": grad_x,
            "chunked grad weight": grad_w}


def _moe_case(device: torch.device, dtype: torch.dtype, fused: bool) -> dict[str, torch.Tensor]:
    from megamoe.model.moe.dispatcher import TokenDispatcher
    from megamoe.parallel.state import single_rank_layout

    tokens, experts, topk = 12, 4, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).to(device)
    x = _randn(g, tokens, _WIDE).to(device, dtype).requires_grad_()
    weights = torch.softmax(_randn(g, tokens, topk), dim=-1).to(device).requires_grad_()
    grad = _randn(g, tokens, _WIDE).to(device, dtype)
    dispatcher = TokenDispatcher(single_rank_layout(), num_experts=experts, ep_size=1, fused_kernels=fused)
    plan = dispatcher.plan(ids, None)  # dropless: the fused combine's case
    rows = dispatcher.dispatch(x, plan)
    # a stand-in expert that tells the rows apart: times 1 + row index / 10
    scale = 1 + torch.arange(rows.shape[0], device=device, dtype=rows.dtype).unsqueeze(-1) / 10
    out = dispatcher.combine(rows * scale, weights, plan)
    grad_x, grad_weights = torch.autograd.grad(out, (x, weights), grad)
    return {"output": out, "grad x": grad_x, "grad weights": grad_weights}


CASES: dict[str, Callable[[torch.device, torch.dtype, bool], dict[str, torch.Tensor]]] = {
    "swiglu": _swiglu_case, "rotary": _rotary_case, "cross_entropy": _cross_entropy_case, "moe": _moe_case,
}
assert tuple(CASES) == kernels.KERNELS


def _tolerance(dtype: torch.dtype, output: str) -> dict:
    return SUMMED_BF16 if dtype == torch.bfloat16 and output.startswith("chunked grad") else TOLERANCES[dtype]


def _difference(plain: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], dtype: torch.dtype) -> str | None:
    """Why ``fused`` is not ``plain`` within the tolerances (the first output that differs), or None."""
    for output, p in plain.items():
        f, tol = fused[output], _tolerance(dtype, output)
        if f.dtype != p.dtype or f.shape != p.shape:
            return f"{output} is {f.dtype} {tuple(f.shape)}, the plain path's {p.dtype} {tuple(p.shape)}"
        try:
            torch.testing.assert_close(f, p, **tol)
        except AssertionError:
            diff = (f.double() - p.double()).abs().nan_to_num(float("inf")).max().item()
            return (f"{str(dtype).removeprefix('torch.')} {output}: max |fused - plain| {diff:.3g}, beyond "
                    f"rtol {tol['rtol']:g} atol {tol['atol']:g}")
    return None


def check_kernel(kernel: str, device: torch.device) -> str | None:
    """Run ``kernel``'s case on ``device`` plain and fused, in fp32 and bf16; None if they agree,
    else why not (the exception, or the largest difference of the first output that differs)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    try:
        for dtype in TOLERANCES:
            plain = CASES[kernel](device, dtype, False)
            with kernels.forced():
                fused = CASES[kernel](device, dtype, True)
            sync(device)  # an asynchronous launch error is this kernel's
            why = _difference(plain, fused, dtype)
            if why is not None:
                return why
    except Exception as err:  # noqa: BLE001 - any failure of a kernel turns that kernel off
        first_line = next(iter(str(err).strip().splitlines()), "")
        return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return None


def check(device: torch.device) -> dict[str, str | None]:
    """Every kernel's ``check_kernel`` on ``device``: kernel -> None (passed) or why it failed.
    Runs with grad on, outside inference mode and autocast, on ``device`` as the current device,
    whatever the caller's context (a model's forward under ``no_grad``)."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
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

