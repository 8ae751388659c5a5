"""Pipeline schedules measured beside their theory: idle time, activations held, point-to-point bytes.

    python bench/bench_pipeline.py                          # 4 ranks: PP 4 (m 4, 8; V 1, 2), PP 2 x TP 2 with SP
    python bench/bench_pipeline.py --stages 2 --sp-tp 0 --micro-batches 8 --virtual 1 --json

``--stages`` P gloo CPU processes train megamoe's model through the trainer's own step
(``megamoe.training.trainer.train_step`` with ``megamoe.training.pipeline.PipelineSchedule``:
torch.distributed.pipelining's 1F1B for V = 1, interleaved 1F1B for V > 1), at PP P x TP 1 for
every ``--micro-batches`` m and ``--virtual`` V, and at PP P / T x TP T with
``--sequence-parallel`` (``--sp-tp`` T) for every m at V 1.  The model has 2 P layers
(``--layers-per-stage``), MoE in every layer, so every stage's chunks hold equal layers; its
real compute is small, and each chunk's forward and backward also sleep ``--forward-ms`` / V and
``--backward-ms`` / V: stages of equal, fixed cost, as kernels on their own GPUs would be (a
sleep, so the processes do not compete for this machine's cores).  For each layout and stage,
averaged over ``--steps`` steps after a warm-up one, printed beside the theory:

* ``wall_ms``: the schedule's span in a step (first forward's start to last backward's end, over
  all ranks), and ``ideal_ms``: (V m + P - 1) (forward + backward) / V, that span with no cost but
  the slept one (what ``wall_ms`` has over it is the real compute, the point-to-point latency
  and Python's dispatch, paid per chunk operation, so it grows with V m).
* ``idle``: 1 - (time inside this stage's forward and backward calls) / ``wall_ms``, and
  ``bubble``: the schedule's idle fraction for stages of equal cost, (P - 1) / (V m + P - 1).
  With m micro-batches of forward + backward cost t on each stage, 1F1B takes (m + P - 1) t and
  each stage computes m t of it: (P - 1) / (m + P - 1).  Interleaving V chunks per stage makes
  the fill and drain V times shorter, (P - 1) t / V: (P - 1) / (V m + P - 1), which is
  (P - 1) / (m + P - 1) divided by V when m is large against P.
* ``held``: the most micro-batches whose activations the stage holds at once (forwards run and
  not yet backwarded, a chunk's micro-batch counting 1 / V), and ``held_theory``: 1F1B runs
  min(P - s, m) forwards on stage s before its first backward (P on the first stage);
  interleaved 1F1B runs (V - 1) P + 2 (P - 1 - s) chunk forwards first, then one more before each
  backward: min((V - 1) P + 2 (P - 1 - s) + 1, V m) / V, P + (P - 1) / V on the first stage.
* ``p2p_fwd``, ``p2p_bwd``: bytes this rank sends per micro-batch (hidden states forward, their
  gradients backward), and their theory: b x s x h x bytes per element, divided by TP under
  sequence parallelism (each TP rank sends its own part of the sequence), per chunk boundary
  crossed: V per stage, less the model's first chunk backward and its last forward.

``--json`` prints one JSON line (every row) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import spawn_cpu_ranks
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import initialize_model_parallel
from megamoe.training.metrics import IntervalMetrics
from megamoe.training.pipeline import PipelineSchedule
from megamoe.training.trainer import train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4, help="P: pipeline stages at TP 1, one CPU process each (4)")
    p.add_argument("--sp-tp", type=int, default=2, help="T: also run PP P / T x TP T with --sequence-parallel, "
                   "at V 1 (2; 0: not)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8], help="m: micro-batches per step (4 8)")
    p.add_argument("--virtual", type=int, nargs="+", default=[1, 2], help="V: model chunks per stage (1 2)")
    p.add_argument("--layers-per-stage", type=int, default=2, help="layers of each stage (2; a multiple of every V)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="b (1)")
    p.add_argument("--seq-length", type=int, default=32, help="s (32)")
    p.add_argument("--hidden-size", type=int, default=64, help="h (64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--forward-ms", type=float, default=20.0, help="one stage's forward of one micro-batch (20)")
    p.add_argument("--backward-ms", type=float, default=40.0, help="one stage's backward of one micro-batch (40)")
    p.add_argument("--steps", type=int, default=2, help="steps measured per layout, after one warm-up step (2)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: measure at least 1 step")
    if args.stages < 2:
        p.error(f"--stages {args.stages}: a pipeline needs at least 2 stages")
    if args.sp_tp and (args.sp_tp < 2 or args.stages % args.sp_tp or args.stages // args.sp_tp < 2
                       or args.seq_length % args.sp_tp):
        p.error(f"--sp-tp {args.sp_tp}: needs 2 <= T with T dividing --stages {args.stages} into at least 2 "
                f"stages and --seq-length {args.seq_length}; 0 runs no sequence-parallel layout")
    for v in args.virtual:
        if v < 1 or args.layers_per_stage % v:
            p.error(f"--virtual {v}: must divide --layers-per-stage {args.layers_per_stage}")
    for m in args.micro_batches:
        if m < args.stages or (max(args.virtual) > 1 and m % args.stages):
            p.error(f"--micro-batches {m}: 1F1B needs at least P = {args.stages} micro-batches, and the "
                    f"interleaved schedule a multiple of P")
    return args


def layouts(args) -> list[tuple[int, int, int, int]]:
    """``(P, TP, m, V)`` of every run: PP ``--stages`` at TP 1 for each m and V, then the
    sequence-parallel layout for each m at V 1."""
    runs = [(args.stages, 1, m, v) for m in args.micro_batches for v in args.virtual]
    if args.sp_tp:
        runs += [(args.stages // args.sp_tp, args.sp_tp, m, 1) for m in args.micro_batches]
    return runs


def bubble_theory(p: int, m: int, v: int) -> float:
    """The idle fraction of a step of (interleaved) 1F1B with P stages of equal cost."""
    return (p - 1) / (v * m + p - 1)


def held_theory(p: int, m: int, v: int, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at most (a chunk's counting 1 / V)."""
    if v == 1:
        return min(p - stage, m)
    return min((v - 1) * p + 2 * (p - 1 - stage) + 1, v * m) / v


def p2p_theory(args, p: int, v: int, stage: int, tp: int) -> tuple[int, int]:
    """Bytes stage ``stage`` sends per micro-batch, (forward, backward): one [b, s / TP, h] tensor
    per chunk boundary it crosses (sequence parallelism at TP > 1)."""
    one = args.micro_batch_size * args.seq_length * args.hidden_size * DTYPES[args.dtype].itemsize // tp
    return (v - (stage == p - 1)) * one, (v - (stage == 0)) * one


class _Probe:
    """Gives each of the schedule's PipelineStages a fixed cost (a sleep in every forward and
    backward call) and records busy seconds, micro-batches held (forwards minus backwards, each
    chunk's counting 1 / V) and their peak, the bytes of its send ops, and the schedule's span."""

    def __init__(self, pipeline: PipelineSchedule, forward_s: float, backward_s: float):
        self.busy = 0.0
        self.held = self.peak = 0
        self.sent = {"fwd": 0, "bwd": 0}
        self.span = (0.0, 0.0)
        for stage in pipeline.stages:
            stage.forward_one_chunk = self._timed(stage.forward_one_chunk, forward_s, +1)
            stage.backward_one_chunk = self._timed(stage.backward_one_chunk, backward_s, -1)
            stage.get_fwd_send_ops = self._counted(stage.get_fwd_send_ops, "fwd")
            stage.get_bwd_send_ops = self._counted(stage.get_bwd_send_ops, "bwd")
        step = pipeline.schedule.step

        def spanned(*a, **kw):
            start = time.perf_counter()
            try:
                return step(*a, **kw)
            finally:
                self.span = (start, time.perf_counter())
        pipeline.schedule.step = spanned

    def reset(self):
        self.busy = 0.0
        self.peak = self.held
        self.sent = {"fwd": 0, "bwd": 0}

    def _timed(self, call, cost_s, change):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            try:
                time.sleep(cost_s)
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


def _model_config(args, num_layers: int) -> ModelConfig:
    h = args.hidden_size
    return ModelConfig(vocab_size=VOCAB, num_layers=num_layers, hidden_size=h, num_attention_heads=4,
                       ffn_hidden_size=2 * h, max_position_embeddings=args.seq_length, num_experts=4,
                       moe_router_topk=2, moe_ffn_hidden_size=h, moe_aux_loss_coeff=1e-2, swiglu=True,
                       add_bias_linear=False)


def _run(args, p: int, tp: int, m: int, v: int, rank: int) -> dict:
    b, s = args.micro_batch_size, args.seq_length
    cpu, dtype = torch.device("cpu"), DTYPES[args.dtype]
    config = _model_config(args, args.layers_per_stage * p)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1, pipeline_model_parallel_size=p,
                              virtual_pipeline_model_parallel_size=v, pipeline_num_layers=config.num_layers,
                              pipeline_num_microbatches=m)
    layout = initialize_model_parallel(parallel, config.experts_by_layer())
    model_parallel_seed(1, layout)
    model = GPTModel(config, layout, ExecutionConfig(params_dtype=dtype)).initialize(1)
    optimizer = MixedPrecisionOptimizer(model, OptimizerConfig(lr=1e-4, params_dtype=dtype), layout)
    pipeline = PipelineSchedule(model, optimizer, num_microbatches=m, micro_batch_size=b, seq_length=s, device=cpu)
    probe = _Probe(pipeline, args.forward_ms / 1e3 / v, args.backward_ms / 1e3 / v)
    metrics = IntervalMetrics(layout=layout, device=cpu, flops_per_token=0.0, peak_tflops=None)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (m, b, s + 1), generator=g)
    batches = [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(b, s)} for x in data]
    walls, idles = [], []
    for step in range(1 + args.steps):
        probe.reset()
        dist.barrier()
        train_step(model, optimizer, batches, metrics, cpu, None, pipeline)
        spans = [None] * layout.world_size
        dist.all_gather_object(spans, probe.span)  # perf_counter is one clock for the machine's processes
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        if step > 0:  # the first step also builds the stages' buffers
            walls.append(wall)
            idles.append(1 - probe.busy / wall)
    fwd, bwd = p2p_theory(args, p, v, layout.pp_rank, tp)
    return {
        "schedule": "1F1B" if v == 1 else "interleaved", "P": p, "TP": tp, "m": m, "V": v, "stage": layout.pp_rank,
        "tp_rank": layout.tp_rank, "wall_ms": round(sum(walls) / len(walls) * 1e3, 1),
        "ideal_ms": round((v * m + p - 1) * (args.forward_ms + args.backward_ms) / v, 1),
        "idle": round(sum(idles) / len(idles), 3), "bubble": round(bubble_theory(p, m, v), 3),
        "held": probe.peak / v, "held_theory": held_theory(p, m, v, layout.pp_rank),
        "p2p_fwd": probe.sent["fwd"] // m, "p2p_fwd_theory": fwd,
        "p2p_bwd": probe.sent["bwd"] // m, "p2p_bwd_theory": bwd,
    }


def _body(rank, world, args):
    return [_run(args, p, tp, m, v, rank) for p, tp, m, v in layouts(args)]


COLUMNS = ("schedule", "P", "TP", "m", "V", "stage", "tp_rank", "wall_ms", "ideal_ms", "idle", "bubble", "held",
           "held_theory", "p2p_fwd", "p2p_fwd_theory", "p2p_bwd", "p2p_bwd_theory")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = [row for per_rank in spawn_cpu_ranks(_body, args.stages, args) for row in per_rank]
    order = {run: i for i, run in enumerate(layouts(args))}
    rows.sort(key=lambda r: (order[(r["P"], r["TP"], r["m"], r["V"])], r["stage"], r["tp_rank"]))
    if args.json:
        print(json.dumps(rows))
        return rows
    print(f"{args.stages} gloo CPU ranks, megamoe's train_step; micro-batch [b {args.micro_batch_size}, "
          f"s {args.seq_length}, h {args.hidden_size}] {args.dtype}, {args.layers_per_stage} MoE layers per stage; "
          f"each stage's forward {args.forward_ms:g} ms and backward {args.backward_ms:g} ms per micro-batch (slept); "
          f"p2p in bytes per micro-batch")
    widths = {c: max(len(c), 11 if c == "schedule" else 6) for c in COLUMNS}
    print("  ".join(f"{c:>{widths[c]}}" for c in COLUMNS))
    for row in rows:
        print("  ".join(f"{row[c]:>{widths[c]}}" for c in COLUMNS))
    return rows


if __name__ == "__main__":
    main()
