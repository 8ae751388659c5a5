"""megamoe's fused Triton kernels against the plain PyTorch path on this GPU: per kernel, pass or
fail and the largest difference, then the forward + backward time of fused and plain at the
moe-1b-4e shape.

    python bench/check_fused_kernels.py                  # on CUDA
    python bench/check_fused_kernels.py --json           # one JSON line instead of the table
    python bench/check_fused_kernels.py --cpu-interpret  # no GPU: the check only, on CPU through Triton's interpreter

The check is the one a run makes at start-up (``megamoe.kernels.guard.check_kernel``: tiny inputs,
forward and backward, fp32 and bf16, the tolerances of ``tests/kernels``); a kernel that fails it
runs as the plain ops in training.  The timing runs each kernel's case (``megamoe.kernels.cases``,
the public function the model calls, forward then backward) at the moe-1b-4e shape in bf16:
SwiGLU on the experts' 32768 x 2 x 5632 rows, RoPE on q of 8 x 16 heads x 2048 x 128, the cross
entropy unchunked on 16384 x 32000 logits plus the LM head chunked by 4096 tokens (GEMMs included,
the same in both paths), the MoE dispatch and combine of 16384 tokens x 2048 top-2 of 4 experts;
3 warm-up runs, then the median of ``--iters`` runs, each between CUDA events; the largest
difference at that shape is printed beside (informational: the pass/fail is the check's).

Without a CUDA device (and without ``--cpu-interpret``) it says so and exits 0.  Exits 1 when a
kernel fails its check or Triton is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch


def _correctness(device: torch.device) -> dict[str, dict]:
    """Per kernel: the start-up check's verdict, and the largest difference per dtype at its shape."""
    from megamoe import kernels
    from megamoe.kernels import guard
    from megamoe.kernels.cases import CASES

    rows = {}
    for kernel in kernels.KERNELS:
        why = guard.check_kernel(kernel, device)
        row = {"pass": why is None, "why": why, "max_diff": {}, "tolerance_used": {}}
        if why is None:
            case = CASES[kernel]
            for dtype in guard.TOLERANCES:
                plain, fused = guard.run_both(kernel, case.inputs(device, dtype, **case.check))
                name = str(dtype).removeprefix("torch.")
                row["max_diff"][name] = guard.max_difference(plain, fused)
                row["tolerance_used"][name] = guard.tolerance_used(plain, fused, dtype)
        rows[kernel] = row
    return rows


def _time_ms(run, inputs, fused: bool, iters: int) -> float:
    """Median milliseconds of ``run(inputs, fused)`` (forward and backward) between CUDA events."""
    from megamoe import kernels

    times = []
    with kernels.forced() if fused else contextlib.nullcontext():
        for i in range(3 + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(inputs, fused)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timing(device: torch.device, passed: list[str], iters: int) -> dict[str, dict]:
    from megamoe.kernels import guard
    from megamoe.kernels.cases import CASES

    rows = {}
    for kernel in passed:
        case = CASES[kernel]
        inputs = case.inputs(device, torch.bfloat16, **case.moe_1b_4e)
        plain, fused = guard.run_both(kernel, inputs)
        diff, used = guard.max_difference(plain, fused), guard.tolerance_used(plain, fused, torch.bfloat16)
        del plain, fused
        rows[kernel] = {"plain_ms": _time_ms(case.run, inputs, False, iters),
                        "fused_ms": _time_ms(case.run, inputs, True, iters), "max_diff_bf16": diff,
                        "tolerance_used_bf16": used}
        del inputs
        torch.cuda.empty_cache()
    return rows


def _print_table(device: torch.device, checks: dict, timings: dict) -> None:
    print(f"fused kernels against the plain PyTorch path on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'Triton interpreter'})")
    print("check (the start-up one): max |fused - plain| over the outputs, and the largest share of the "
          "tolerance (atol + rtol |plain|) it takes (pass: at most 1)")
    print(f"{'kernel':<14} {'check':<5} {'fp32 max diff':>13} {'of tol':>7} {'bf16 max diff':>13} {'of tol':>7}")
    for kernel, row in checks.items():
        cells = [f"{row['max_diff'][d]:13.3g} {row['tolerance_used'][d]:7.3f}" if d in row["max_diff"]
                 else f"{'-':>13} {'-':>7}" for d in ("float32", "bfloat16")]
        print(f"{kernel:<14} {'pass' if row['pass'] else 'FAIL':<5} {' '.join(cells)}"
              + ("" if row["pass"] else f"  {row['why']}"))
    if timings:
        print("forward + backward at moe-1b-4e, bf16 (median ms):")
        print(f"{'kernel':<14} {'plain':>8} {'fused':>8} {'speedup':>8} {'max diff':>9} {'of tol':>7}")
        for kernel, t in timings.items():
            print(f"{kernel:<14} {t['plain_ms']:8.3f} {t['fused_ms']:8.3f} {t['plain_ms'] / t['fused_ms']:7.2f}x "
                  f"{t['max_diff_bf16']:9.3g} {t['tolerance_used_bf16']:7.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="without a GPU: run the check (not the timing) on CPU through Triton's interpreter")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per kernel and path (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()
    if args.cpu_interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--cpu-interpret: Triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import: it is read then
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("no CUDA device: nothing to check here (the fused kernels run only on CUDA); run this on a GPU, "
              "or with --cpu-interpret to check them on CPU through Triton's interpreter")
        return 0
    from megamoe import kernels

    if not kernels.available():
        print("Triton is not installed: the fused kernels need the gpu extra (pip install -e '.[gpu]')")
        return 1
    from megamoe.kernels import guard

    with guard.checking(device):
        checks = _correctness(device)
        passed = [kernel for kernel, row in checks.items() if row["pass"]]
        timings = _timing(device, passed, args.iters) if device.type == "cuda" else {}
    if args.json:
        print(json.dumps({"device": str(device), "checks": checks, "timings_moe_1b_4e_bf16": timings}))
    else:
        _print_table(device, checks, timings)
    return 0 if len(passed) == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
