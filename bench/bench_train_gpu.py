"""Training throughput of megamoe on one GPU for the peer benchmark shape "moe-1b-4e".

    python bench/bench_train_gpu.py                 # eager
    python bench/bench_train_gpu.py --compile       # regional torch.compile (megamoe.model.compile)
    python bench/bench_train_gpu.py --tiny          # CPU smoke test of the script itself

Shape (the peer benchmarks' "moe-1b-4e"): 16 layers, hidden 2048, 16 heads, SwiGLU experts ffn 5632,
4 experts top-2 every layer, vocab 32000, seq 2048, micro batch 8, bf16 weights, aux loss 0.01,
untied embeddings, no biases.  Unlike the peers, megamoe keeps fp32 master weights and fp32 main
grads and clips the grad norm (more work per step).  3 warm-up steps, then --steps timed steps,
each bracketed by synchronize; prints one JSON line with the median step time, tokens/s,
TFLOP/s (the peers' FLOPs convention) and MFU against 989 TFLOP/s (megamoe.training.flops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from megamoe.model.compile import compile_regions
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import initialize_model_parallel
from megamoe.training.flops import flops_per_token, mfu, peak_tflops_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--no-grouped-gemm", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print the top CUDA ops of 2 steps")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    init_distributed(device)
    if args.tiny:
        shape = dict(vocab_size=512, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq=64)
    else:
        shape = dict(vocab_size=32000, num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632, seq=2048)
    seq = shape.pop("seq")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig(
        **shape, max_position_embeddings=seq, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
        add_bias_linear=False, untie_embeddings_and_output_weights=True,
        num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01,
    )
    layout = initialize_model_parallel(ParallelConfig(), config.experts_by_layer())
    model_parallel_seed(1234, layout, device)
    execution = ExecutionConfig(params_dtype=dtype, moe_grouped_gemm=not args.no_grouped_gemm)
    model = GPTModel(config, layout, execution, device=device).initialize(1234)
    if args.compile:
        compile_regions(model)
    optimizer = MixedPrecisionOptimizer(
        model, OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0, params_dtype=dtype), layout
    )
    mb = args.micro_batch
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (mb, seq + 1), device=device, generator=generator)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> tuple[float, float, float]:
        """(forward, backward, optimizer) seconds of one training step."""
        t0 = sync()
        optimizer.zero_grad()
        out = model(tokens[:, :-1], tokens[:, 1:])
        t1 = sync()
        optimizer.scale_loss(out.loss).backward()
        t2 = sync()
        optimizer.step()
        t3 = sync()
        return t1 - t0, t2 - t1, t3 - t2

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = [step() for _ in range(args.steps)]
    median = statistics.median(sum(p) for p in phases)
    fwd, bwd, opt = (statistics.median(p[i] for p in phases) for i in range(3))
    tokens_per_s = mb * seq / median
    tflops = flops_per_token(config, seq) * tokens_per_s / 1e12
    print(json.dumps({
        "framework": "megamoe" + (" + regional compile" if args.compile else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "grouped_gemm": not args.no_grouped_gemm,
        "micro_batch": mb,
        "step_ms_median": round(1000 * median, 1),
        "forward_ms": round(1000 * fwd, 1),
        "backward_ms": round(1000 * bwd, 1),
        "optimizer_ms": round(1000 * opt, 1),
        "tokens_per_s": round(tokens_per_s),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": mfu(tflops, peak_tflops_of(torch.cuda.get_device_name()) if device.type == "cuda" else None),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        "optimizer": optimizer.adam_kind,
    }), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=60), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
