"""Optimizer step cost with and without ZeRO-1 on 4 CPU ranks (gloo): time, bytes, memory.

    python bench/bench_optimizer.py                          # MoE GPT, TP=1, EP=2 (DP=4, EDP=2), bf16
    python bench/bench_optimizer.py --ep 4 --dtype fp32 --iters 20

For each of ZeRO-1 off / on, every rank runs forward+backward on random tokens, then the timed
part: ``opt.finish_grad_sync()`` then ``opt.step()`` (unscale + norm + clip + Adam + param
all-gather).
Prints, from rank 0:

* the median and min over ``--iters`` steps of the wall time of the gradient reduction
  (``opt.finish_grad_sync()``), of the rest of ``opt.step()``, and of both;
* bytes sent per rank per step for each collective group, and their analytic minimum.  "Sent"
  is the ring-algorithm volume of each collective the optimizer launched, recorded by wrapping
  ``torch.distributed``: all-reduce 2(G-1)/G x payload, reduce-scatter and all-gather
  (G-1)/G x the full buffer.  The minimum is the same for the unpadded parameters alone:
  without ZeRO-1 an fp32 all-reduce of the group's N params, with ZeRO-1 an fp32 reduce-scatter
  plus an all-gather in the param dtype.  The gap is bucket/alignment padding, plus the
  grad-norm all-gather over the world (16 B per rank per norm part);
* optimizer-state bytes per rank (fp32 master + Adam m, v actually allocated), next to the
  formula 12 x owned + 4 x padding and the ideal 12 x N / G (N: the part's params on this rank
  before sharding, G: its shard group size, 1 without ZeRO-1).
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.optim.grad_buffer import grad_reduction
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.params import param_meta
from megamoe.parallel.state import initialize_model_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--hidden", type=int, default=240, help="240: norm weights need alignment padding")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--bucket-size", type=int, default=1_000_000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    return p.parse_args()


class CommRecorder:
    """Wraps the collectives the optimizer calls and adds up ring-algorithm bytes per group."""

    def __init__(self, names: dict) -> None:
        self.names = names  # process group -> name
        self.sent: dict[str, float] = {}
        self.active = False
        ops = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor")
        for op in ops:
            if hasattr(dist, op):
                setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op, fn):
        def wrapped(*args, group=None, **kwargs):
            if self.active:
                size = dist.get_world_size(group)
                tensor = args[1] if op.startswith("reduce_scatter") else args[0]  # the full-size buffer
                factor = 2 * (size - 1) / size if op == "all_reduce" else (size - 1) / size
                name = self.names.get(group, "other")
                self.sent[name] = self.sent.get(name, 0.0) + factor * tensor.numel() * tensor.element_size()
            return fn(*args, group=group, **kwargs)

        return wrapped


def group_names(state) -> dict:
    names = {state.world_group: "world(norm)", state.dp_group: "dp"}
    for ep, groups in state.expert.items():
        names.setdefault(groups.edp_group, f"edp(ep={ep})")
    return names


def analytic_minimum(model, state, zero: bool) -> dict[str, float]:
    """Bytes per rank per step for the unpadded params of each reduction group."""
    out = {}
    for _, p in model.named_parameters():
        reduction = grad_reduction(param_meta(p), state)
        name, size = reduction.name, reduction.size
        frac = (size - 1) / size
        per_param = frac * (4 + p.element_size()) if zero else 2 * frac * 4
        out[name] = out.get(name, 0.0) + per_param * p.numel()
    return out


def model_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
        max_position_embeddings=128, num_experts=args.experts, moe_router_topk=2,
        moe_ffn_hidden_size=args.hidden * 2, swiglu=True, add_bias_linear=False,
    )


def run_layout(args, state, zero: bool, recorder: CommRecorder):
    dtype = DTYPES[args.dtype]
    model = GPTModel(model_config(args), state, ExecutionConfig(params_dtype=dtype)).initialize(seed=1)
    opt = MixedPrecisionOptimizer(
        model,
        OptimizerConfig(lr=1e-4, params_dtype=dtype, use_distributed_optimizer=zero, bucket_size=args.bucket_size),
        state,
    )
    g = torch.Generator().manual_seed(state.rank)
    times = []
    for i in range(args.warmup + args.iters):
        tokens = torch.randint(0, 4096, (2, 128), generator=g)
        opt.zero_grad()
        opt.scale_loss(model(tokens, tokens).loss).backward()
        dist.barrier()
        recorder.active = i == args.warmup  # record one step's traffic
        start = time.perf_counter()
        opt.finish_grad_sync()
        reduced = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        recorder.active = False
        if i >= args.warmup:
            times.append((end - start, reduced - start, end - reduced))
    stats = opt.memory_stats()
    minimum = analytic_minimum(model, state, zero)
    numel, group_size = {}, {}
    for _, p in model.named_parameters():
        reduction = grad_reduction(param_meta(p), state)
        numel[reduction.name] = numel.get(reduction.name, 0) + p.numel()
        group_size[reduction.name] = reduction.size
    for part, s in stats.items():
        s["ideal_bytes"] = 12 * numel[part] / (group_size[part] if zero else 1)
    return times, stats, minimum


def worker(rank, args, store):
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), rank=rank, world_size=args.world_size, store_path=store)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, expert_model_parallel_size=(args.ep,))
    state = initialize_model_parallel(parallel, model_config(args).experts_by_layer())
    recorder = CommRecorder(group_names(state))
    for zero in (False, True):
        recorder.sent = {}
        times, stats, minimum = run_layout(args, state, zero, recorder)
        everyone = [None] * args.world_size
        dist.all_gather_object(everyone, (rank, stats))
        if rank == 0:
            report(args, zero, times, recorder.sent, minimum, everyone)
    dist.destroy_process_group()


def _bytes(n: float) -> str:
    return f"{n / 1e6:10.3f} MB" if n >= 1e5 else f"{n:10.0f} B "


def report(args, zero, times, sent, minimum, everyone):
    print(f"\n=== ZeRO-1 {'on' if zero else 'off'}: world {args.world_size}, TP={args.tp}, EP={args.ep}, {args.dtype} ===")
    for label, column in (("reduce + step", 0), ("  reduce (finish_grad_sync)", 1), ("  step (norm, clip, Adam, gather)", 2)):
        values = [t[column] * 1e3 for t in times]
        print(f"{label:<34} median {statistics.median(values):7.1f} ms   min {min(values):7.1f} ms")
    print("bytes sent per rank per step (rank 0):")
    for name in sorted(set(sent) | set(minimum)):
        got, best = sent.get(name, 0.0), minimum.get(name, 0.0)
        ratio = f"{got / best:.3f}x" if best else "-"
        print(f"  {name:<12} sent {_bytes(got)}   analytic minimum {_bytes(best)}   {ratio}")
    print("optimizer state bytes per rank (fp32 master + Adam m, v):")
    for rank, stats in everyone:
        for part, s in sorted(stats.items()):
            padding = s["shard_numel"] - s["owned_numel"]
            measured = s["master_bytes"] + s["adam_bytes"]
            formula = 12 * s["owned_numel"] + 4 * padding
            print(
                f"  rank {rank} {part:<12} owned {s['owned_numel']:>9} + padding {padding:>5}: "
                f"{measured / 1e6:8.3f} MB measured, {formula / 1e6:8.3f} MB = 12*owned + 4*padding, "
                f"ideal 12*N/G {s['ideal_bytes'] / 1e6:8.3f} MB"
            )


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "store")), nprocs=args.world_size)


if __name__ == "__main__":
    main()
