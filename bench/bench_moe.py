"""MoE layer forward+backward throughput: grouped GEMM (torch._grouped_mm) vs the per-expert fallback.

    python bench/bench_moe.py                                  # CPU, EP=1, one process
    python bench/bench_moe.py --tokens 4096 --hidden 512 --ffn 1024 --experts 8 --topk 2
    python bench/bench_moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --ffn 5632 --experts 4
    torchrun --nproc-per-node 4 bench/bench_moe.py --ep 4     # EP over 4 ranks (rank 0 prints)

Builds one ``MoELayer`` (SwiGLU experts, dropless, aux and z losses on) at EP=``--ep``, TP=1, and
times ``forward -> (out * g).sum() + aux.loss -> backward`` on random tokens: ``--warmup``
untimed steps, then the median of ``--iters`` timed steps.  Prints tokens/s of this rank for
each expert path and whether ``torch._grouped_mm`` was really used.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.moe.experts import grouped_mm_supported
from megamoe.model.moe.layer import MoELayer
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.params import initialize_module_
from megamoe.parallel.state import initialize_model_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank (micro batch x sequence)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="--moe-ffn-hidden-size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (= world size under torchrun)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, layout, device, dtype, grouped: bool):
    config = ModelConfig(
        vocab_size=128, num_layers=2, hidden_size=args.hidden, swiglu=True, add_bias_linear=False, num_attention_heads=1, num_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn, moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001,
    )
    layer = MoELayer(config, 0, layout, dtype=dtype, grouped_gemm=grouped, device=device)
    initialize_module_(layer, 1234, layout)
    return layer


def step(layer, x, grad_out, device) -> float:
    """One forward + backward; seconds."""
    synchronize(device)
    start = time.perf_counter()
    out, aux = layer(x)
    ((out * grad_out).sum() + aux.loss).backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return seconds


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    init_distributed(device)
    if dist.get_world_size() != args.ep:
        raise ValueError(f"--ep {args.ep} must equal the number of processes ({dist.get_world_size()})")
    layout = initialize_model_parallel(ParallelConfig(expert_model_parallel_size=(args.ep,)), {0: args.experts})
    if dist.get_rank() == 0:
        print(f"MoE layer fwd+bwd: tokens/rank={args.tokens} hidden={args.hidden} ffn={args.ffn} "
              f"experts={args.experts} top-{args.topk} EP={args.ep} {args.dtype} on {device} "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(1, args.tokens, args.hidden, device=device, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(1, args.tokens, args.hidden, device=device, generator=gen).to(dtype)
    layers = {"grouped": build(args, layout, device, dtype, True), "fallback": build(args, layout, device, dtype, False)}
    # Alternate the two paths step by step so that a busy machine slows both alike.
    times = {name: [] for name in layers}
    for i in range(args.warmup + args.iters):
        for name, layer in layers.items():
            seconds = step(layer, x, grad_out, device)
            if i >= args.warmup:
                times[name].append(seconds)
    fc2 = layers["grouped"].experts.fc2
    used = grouped_mm_supported(x.detach().view(-1, args.hidden), fc2.transpose(-2, -1))
    if dist.get_rank() == 0:
        for name, values in times.items():
            seconds = statistics.median(values)
            note = "  (torch._grouped_mm unusable here: this ran the fallback)" if name == "grouped" and not used else ""
            print(f"  {name:8s}  {seconds * 1e3:8.2f} ms/step  {args.tokens / seconds:12,.0f} tokens/s{note}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
