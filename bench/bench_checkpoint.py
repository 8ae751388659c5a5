"""Checkpoint bytes and save/load time against the unique state, over layouts (CPU ranks, gloo).

    python bench/bench_checkpoint.py                       # DP 1/2/4 x TP 1/2 x EP 1/2/4 x ZeRO-1 off/on
    python bench/bench_checkpoint.py --layouts 1,4,2,1 2,2,2,0 --dtype fp32

A layout is TP,DP,EP,ZERO.  For each, the ranks build a small MoE GPT, take one optimizer step
(so the Adam moments exist), save with ``megamoe.training.checkpoint.save_checkpoint`` and load
the checkpoint back into the same layout.  Printed, per layout:

* ``bytes``: everything in the checkpoint directory (shard files and metadata.json);
* ``unique``: the state that has to be on disk once: every global parameter in its dtype, its
  fp32 master and Adam m and v (12 bytes per element), the persistent buffers, and each rank's
  RNG states (as pickled); the scaler, step counters and data position are in metadata.json;
* ``ratio`` = bytes / unique (replicas written once each would make it DP or more);
* the largest and smallest shard file (how evenly the writes are spread over the ranks);
* save and load wall time (slowest rank).
"""

import argparse
import io
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.checkpointing.format import read_metadata
from megamoe.checkpointing.box_views import persistent_tensors, placements
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.state import initialize_model_parallel
from megamoe.training import checkpoint as ckpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="*", default=None, help="TP,DP,EP,ZERO each (default: the full grid)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    return p.parse_args()


def default_layouts() -> list[tuple[int, int, int, bool]]:
    return [(tp, dp, ep, zero) for tp in (1, 2) for dp in (1, 2, 4) for ep in (1, 2, 4) if ep <= dp
            for zero in (False, True)]


def _rng_bytes(states: dict) -> int:
    buffer = io.BytesIO()
    torch.save(states, buffer)
    return len(buffer.getvalue())


def body(rank, world, store, args, layout, root, out):
    tp, dp, ep, zero = layout
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), rank=rank, world_size=world, store_path=store)
    dtype = DTYPES[args.dtype]
    config = ModelConfig(
        vocab_size=args.vocab, num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
        ffn_hidden_size=args.hidden * 2, max_position_embeddings=64, num_experts=args.experts, moe_router_topk=2,
        moe_ffn_hidden_size=args.hidden * 2, untie_embeddings_and_output_weights=True,
    )
    state = initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=(ep,)),
                                      config.experts_by_layer())
    model_parallel_seed(1, state)
    model = GPTModel(config, state, ExecutionConfig(params_dtype=dtype)).initialize(seed=1)
    opt = MixedPrecisionOptimizer(model, OptimizerConfig(lr=1e-4, params_dtype=dtype, use_distributed_optimizer=zero),
                                  state)
    tokens = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(state.dp_rank))
    opt.zero_grad()
    opt.scale_loss(model(tokens, tokens).loss).backward()
    opt.step()
    rng = torch.tensor([_rng_bytes(ckpt._rng_state(state.rng))], dtype=torch.float64)
    dist.all_reduce(rng)

    dist.barrier()
    start = time.perf_counter()
    ckpt.save_checkpoint(root, iteration=1, consumed_samples=2, model=model, optimizer=opt, model_config=config,
                         layout=state, use_distributed_optimizer=zero, args={"seed": 1})
    times = [time.perf_counter() - start]
    dist.barrier()
    start = time.perf_counter()
    loaded = ckpt.open_checkpoint(root, config, state)
    loaded.load_model(model)
    loaded.load_optimizer(opt, model)
    times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        directory, metadata = read_metadata(root)
        on_disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        unique = rng.item()
        where = placements(model, state)
        params = dict(model.named_parameters())
        for name, tensor in persistent_tensors(model).items():
            numel = math.prod(where[name].global_shape)
            unique += numel * (tensor.element_size() + (12 if name in params else 0))
        shards = [e["bytes"] for e in metadata["files"].values()]
        out.put((on_disk, unique, max(shards), min(shards), slowest[0].item(), slowest[1].item()))
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    layouts = default_layouts()
    if args.layouts:
        layouts = [tuple(int(v) for v in text.split(",")) for text in args.layouts]
        layouts = [(tp, dp, ep, bool(zero)) for tp, dp, ep, zero in layouts]
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts, vocab {args.vocab}, "
          f"params {args.dtype}; unique = weights + 12 B/param (fp32 master, Adam m, v) + buffers + RNG per rank")
    print(f"{'TP':>3} {'DP':>3} {'EP':>3} {'ZeRO':>5} {'bytes':>12} {'unique':>12} {'ratio':>6} "
          f"{'max shard':>10} {'min shard':>10} {'save s':>7} {'load s':>7}")
    ctx = mp.get_context("spawn")
    for tp, dp, ep, zero in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            out = ctx.SimpleQueue()
            mp.start_processes(body, args=(tp * dp, os.path.join(tmp, "store"), args, (tp, dp, ep, zero),
                                           os.path.join(tmp, "ckpt"), out), nprocs=tp * dp, start_method="spawn")
            on_disk, unique, largest, smallest, save_s, load_s = out.get()
        print(f"{tp:>3} {dp:>3} {ep:>3} {'on' if zero else 'off':>5} {on_disk:>12,} {int(unique):>12,} "
              f"{on_disk / unique:>6.3f} {largest:>10,} {smallest:>10,} {save_s:>7.2f} {load_s:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
