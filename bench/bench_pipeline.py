"""Pipeline schedules measured beside their theory: idle time, activations held, point-to-point bytes.

    python bench/bench_pipeline.py                          # P 4; m 4 and 8; 1F1B and interleaved V 2
    python bench/bench_pipeline.py --stages 2 --micro-batches 8 --virtual 1 --json

P gloo CPU processes run ``torch.distributed.pipelining``'s 1F1B (V = 1) or interleaved 1F1B
(V > 1) over P x V model chunks of equal, fixed cost: each chunk's forward sleeps
``--forward-ms`` / V and its backward ``--backward-ms`` / V around a real [b, s, h] activation
that crosses the stages (a sleep, not arithmetic, so the P processes do not compete for the
cores and each stage costs exactly what it is told, as a kernel running on its own GPU would).
For each schedule and stage, averaged over ``--steps`` steps after a warm-up one, printed beside
the theory:

* ``wall_ms``: the step's wall time, and ``ideal_ms``: (V m + P - 1) (forward + backward) / V, the
  schedule's step with no cost but the stages' (what ``wall_ms`` has over it is the schedule's
  own: the point-to-point latency and Python's dispatch, paid per chunk operation, so it grows
  with V m).
* ``idle``: 1 - (time inside this stage's forward and backward calls) / (the step's wall time),
  and ``bubble``: the schedule's idle fraction for stages of equal cost, (P - 1) / (V m + P - 1).
  With m micro-batches of forward + backward cost t on each stage, 1F1B takes (m + P - 1) t and
  each stage computes m t of it: (P - 1) / (m + P - 1).  Interleaving V chunks per stage makes
  the fill and drain V times shorter, (P - 1) t / V: (P - 1) / (V m + P - 1), which is
  (P - 1) / (m + P - 1) divided by V when m is large against P.
* ``held``: the most micro-batches whose activations the stage holds at once (forwards run and
  not yet backwarded, a chunk's micro-batch counting 1 / V), and ``held_theory``: 1F1B runs
  min(P - s, m) forwards on stage s before its first backward (P on the first stage);
  interleaved 1F1B runs (V - 1) P + 2 (P - 1 - s) chunk forwards first, then one more before each
  backward: min((V - 1) P + 2 (P - 1 - s) + 1, V m) / V, P + (P - 1) / V on the first stage.
* ``p2p_fwd``, ``p2p_bwd``: bytes this stage sends per micro-batch (activations forward,
  their gradients backward), and ``p2p_theory``: b x s x h x bytes per element (divided by TP
  under sequence parallelism) per chunk boundary crossed: V per stage, less the model's first
  chunk backward and its last forward.

``--json`` prints one JSON line (every row) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from megamoe.parallel.launch import spawn_cpu_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4, help="P: pipeline stages, one CPU process each (4)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8], help="m: micro-batches per step (4 8)")
    p.add_argument("--virtual", type=int, nargs="+", default=[1, 2], help="V: model chunks per stage (1 2)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="b (2)")
    p.add_argument("--seq-length", type=int, default=64, help="s (64)")
    p.add_argument("--hidden-size", type=int, default=128, help="h (128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--forward-ms", type=float, default=20.0, help="one stage's forward of one micro-batch (20)")
    p.add_argument("--backward-ms", type=float, default=40.0, help="one stage's backward of one micro-batch (40)")
    p.add_argument("--steps", type=int, default=2, help="steps measured per schedule, after one warm-up step (2)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: measure at least 1 step")
    if args.stages < 2:
        p.error(f"--stages {args.stages}: a pipeline needs at least 2 stages")
    for m in args.micro_batches:
        for v in args.virtual:
            if v > 1 and m % max(1, m // args.stages):
                p.error(f"--micro-batches {m} with --virtual {v}: torch's interleaved 1F1B runs max(1, m // P) "
                        f"rounds of micro-batches, so m must be a multiple of {m // args.stages} at P {args.stages}")
    return args


def bubble_theory(p: int, m: int, v: int) -> float:
    """The idle fraction of a step of (interleaved) 1F1B with P stages of equal cost."""
    return (p - 1) / (v * m + p - 1)


def held_theory(p: int, m: int, v: int, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at most (a chunk's counting 1 / V)."""
    if v == 1:
        return min(p - stage, m)
    return min((v - 1) * p + 2 * (p - 1 - stage) + 1, v * m) / v


def p2p_theory(args, v: int, stage: int, tp: int = 1) -> tuple[int, int]:
    """Bytes stage ``stage`` sends per micro-batch, (forward, backward): one [b, s / tp, h] tensor per
    chunk boundary it crosses (``tp``: the TP size under sequence parallelism, else 1)."""
    one = args.micro_batch_size * args.seq_length * args.hidden_size * DTYPES[args.dtype].itemsize // tp
    p = args.stages
    fwd = v - (1 if stage == p - 1 else 0)
    bwd = v - (1 if stage == 0 else 0)
    return fwd * one, bwd * one


class _FixedCost(torch.autograd.Function):
    """Identity whose forward sleeps ``forward_s`` and whose backward sleeps ``backward_s``."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class _Chunk(nn.Module):
    """One model chunk: a [h, h] linear map of the [b, s, h] activation, at a fixed cost."""

    def __init__(self, hidden: int, dtype: torch.dtype, forward_s: float, backward_s: float):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.costs = (forward_s, backward_s)

    def forward(self, x):
        return _FixedCost.apply(self.linear(x), *self.costs)


class _Probe:
    """Wraps each PipelineStage's forward/backward calls and send ops: busy seconds, micro-batches
    held (forwards minus backwards, each chunk's counting 1 / V) and their peak, bytes sent."""

    def __init__(self, stages: list[PipelineStage]):
        self.v = len(stages)
        self.busy = 0.0
        self.held = self.peak = 0
        self.sent = {"fwd": 0, "bwd": 0}
        for stage in stages:
            self._wrap(stage)

    def reset(self):
        self.busy = 0.0
        self.peak = self.held
        self.sent = {"fwd": 0, "bwd": 0}

    def _timed(self, call, change):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            try:
                return call(*a, **kw)
            finally:
                self.busy += time.perf_counter() - start
                self.held += change
                self.peak = max(self.peak, self.held)
        return wrapped

    def _counted(self, call, key):
        def wrapped(*a, **kw):
            ops = call(*a, **kw)
            self.sent[key] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops
        return wrapped

    def _wrap(self, stage: PipelineStage):
        stage.forward_one_chunk = self._timed(stage.forward_one_chunk, +1)
        stage.backward_one_chunk = self._timed(stage.backward_one_chunk, -1)
        stage.get_fwd_send_ops = self._counted(stage.get_fwd_send_ops, "fwd")
        stage.get_bwd_send_ops = self._counted(stage.get_bwd_send_ops, "bwd")


def _schedule(args, m: int, v: int, rank: int):
    """This rank's V chunks (chunk c is model stage c P + rank) and their schedule."""
    p, b, s, h = args.stages, args.micro_batch_size, args.seq_length, args.hidden_size
    dtype = DTYPES[args.dtype]
    stages = []
    for c in range(v):
        index = c * p + rank
        chunk = _Chunk(h, dtype, args.forward_ms / 1e3 / v, args.backward_ms / 1e3 / v)
        stages.append(PipelineStage(chunk, index, p * v, torch.device("cpu"), input_args=torch.empty(b, s, h, dtype=dtype)))
    loss_fn = lambda out, target: (out.float() - target).pow(2).mean()  # noqa: E731
    if v == 1:
        return stages, Schedule1F1B(stages[0], m, loss_fn=loss_fn, scale_grads=False)
    return stages, ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn, scale_grads=False)


def _body(rank, world, args):
    b, s, h = args.micro_batch_size, args.seq_length, args.hidden_size
    rows = []
    for m in args.micro_batches:
        for v in args.virtual:
            torch.manual_seed(0)
            stages, schedule = _schedule(args, m, v, rank)
            probe = _Probe(stages)
            x = torch.randn(m * b, s, h, dtype=DTYPES[args.dtype])
            target = torch.randn(m * b, s, h)
            walls, idles = [], []
            for step in range(1 + args.steps):
                probe.reset()
                dist.barrier()
                start = time.perf_counter()
                if rank == 0:
                    schedule.step(x)
                elif rank == world - 1:
                    schedule.step(target=target)
                else:
                    schedule.step()
                dist.barrier()
                wall = time.perf_counter() - start
                if step > 0:  # the first step also builds the stages' buffers
                    walls.append(wall)
                    idles.append(1 - probe.busy / wall)
            fwd, bwd = p2p_theory(args, v, rank)
            rows.append({
                "schedule": "1F1B" if v == 1 else "interleaved", "P": world, "m": m, "V": v, "stage": rank,
                "wall_ms": round(sum(walls) / len(walls) * 1e3, 1),
                "ideal_ms": round((v * m + world - 1) * (args.forward_ms + args.backward_ms) / v, 1),
                "idle": round(sum(idles) / len(idles), 3), "bubble": round(bubble_theory(world, m, v), 3),
                "held": probe.peak / v, "held_theory": held_theory(world, m, v, rank),
                "p2p_fwd": probe.sent["fwd"] // m, "p2p_fwd_theory": fwd,
                "p2p_bwd": probe.sent["bwd"] // m, "p2p_bwd_theory": bwd,
            })
    return rows


COLUMNS = ("schedule", "P", "m", "V", "stage", "wall_ms", "ideal_ms", "idle", "bubble", "held", "held_theory",
           "p2p_fwd", "p2p_fwd_theory", "p2p_bwd", "p2p_bwd_theory")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = [row for per_rank in spawn_cpu_ranks(_body, args.stages, args) for row in per_rank]
    rows.sort(key=lambda r: (r["m"], r["V"], r["stage"]))
    if args.json:
        print(json.dumps(rows))
        return rows
    print(f"{args.stages} gloo CPU ranks; micro-batch [b {args.micro_batch_size}, s {args.seq_length}, "
          f"h {args.hidden_size}] {args.dtype}; each stage's forward {args.forward_ms:g} ms and backward "
          f"{args.backward_ms:g} ms per micro-batch (slept); p2p in bytes per micro-batch")
    widths = {c: max(len(c), 11 if c == "schedule" else 6) for c in COLUMNS}
    print("  ".join(f"{c:>{widths[c]}}" for c in COLUMNS))
    for row in rows:
        print("  ".join(f"{row[c]:>{widths[c]}}" for c in COLUMNS))
    return rows


if __name__ == "__main__":
    main()
