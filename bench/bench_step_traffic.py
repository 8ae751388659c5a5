"""Memory traffic and kernel launches of one training step, counted op by op on CPU, at any shape.

    python bench/bench_step_traffic.py --shape moe-1b-4e          # the peer benchmarks' shape
    python bench/bench_step_traffic.py --shape tiny --json        # the CI shape, one JSON line
    python bench/bench_step_traffic.py --cross-entropy-chunk-size 0   # the LM head unchunked
    python bench/bench_step_traffic.py --no-fused-kernels            # without megamoe's Triton kernels

One training step (``megamoe.training.trainer.train_step``: zero the main grads, forward,
backward, gradient reduction, grad norm, clipping, AdamW on the fp32 masters, copy back to the
bf16 parameters) of the real ``GPTModel`` and ``MixedPrecisionOptimizer`` runs eagerly on the
``meta`` device (shapes and dtypes, no data, no GPU), under ``bench/traffic_counter.py``'s dispatch
mode, which counts each op's bytes read and written and
its kernel launches.  It prints them by category beside the analytic minimum of the non-GEMM
part (``minimum_bytes``) and their ratio.

The shape "moe-1b-4e": 16 layers, hidden 2048, 16 heads, RoPE, RMSNorm, 4 SwiGLU experts of ffn
5632 in every layer, top-2, aux loss 0.01 and z-loss 0.001, vocabulary 32000, untied output
layer, no biases, sequence 2048, micro-batch 8 (16,384 tokens), one micro-batch per step, bf16
parameters with fp32 main grads and master weights, clipping at 1.0.

What runs differs from a GPU step only where stated in the output:

* world size 1 (one process, no GPU): the gradient buckets are reduced over groups of size 1, so
  the code launches no reduction (and skips the 1 / DP scale, which is 1); the grad norm's one
  world all-gather runs, on a group of one.
* balanced routing: the step's host reads (the dispatcher's split sizes, the grad-norm table)
  have no data behind them; the split sizes are answered as T * K / E token-slots per expert, the
  norm table with values that make the norm 2 (above --clip-grad 1, so clipping runs) and every
  gradient and the loss finite.
* attention: SDPA on meta would run its math fallback (the s x s scores in memory); on an
  H100/H200 it picks the flash kernel for bf16 causal attention of head dim 128, so the bench
  runs that kernel's op (``aten._scaled_dot_product_flash_attention``, forward and backward) in
  its place (``FlashAttention``).
* AdamW: ``megamoe.optim.adam.build_adam`` probes with data which AdamW runs on the device; a meta
  tensor has none, so the bench gives the answer the probe gives on CUDA: torch's fused AdamW,
  clipping through its ``grad_scale``.  torch refuses ``fused=True`` on a device not in its list
  (the kernel itself runs on meta), so the bench adds ``meta`` to that list.
* RMSNorm: on CUDA ``F.rms_norm`` runs torch's fused kernel (``aten._fused_rms_norm``), one
  kernel forward and one backward; a CPU build of torch has only its decomposition (nine ops
  forward, about twenty backward), so the bench counts each norm as the fused kernels
  (``FusedRMSNorm``: forward reads x and the weight and writes y and the fp32 1/rms per row;
  backward reads dy, x, the weight and 1/rms and writes dx and the weight gradient).
* megamoe's fused Triton kernels (``megamoe.kernels``: SwiGLU, RoPE, cross entropy, the MoE
  combine and the dispatch's backward): the model
  runs them on CUDA when Triton is installed (``kernels.use_fused``); the bench gives the answer
  it gives on CUDA, so they are counted when Triton can be imported here (the output says so) and
  ``--no-fused-kernels`` is not given.  Each is a custom op whose meta implementation allocates
  its outputs: one launch reading its inputs and writing its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from traffic_counter import TrafficCounter  # noqa: E402

from megamoe import kernels  # noqa: E402
from megamoe.model.config import ModelConfig  # noqa: E402
from megamoe.model.execution import ExecutionConfig  # noqa: E402
from megamoe.model.gpt import GPTModel  # noqa: E402
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig  # noqa: E402
from megamoe.optim import adam as adam_module  # noqa: E402
from megamoe.parallel.config import ParallelConfig  # noqa: E402
from megamoe.parallel.state import initialize_model_parallel  # noqa: E402
from megamoe.training.metrics import IntervalMetrics  # noqa: E402
from megamoe.training.trainer import train_step  # noqa: E402

SHAPES = {
    "moe-1b-4e": dict(vocab_size=32000, num_layers=16, hidden_size=2048, num_attention_heads=16,
                      ffn_hidden_size=5632, seq=2048, micro_batch=8),
    "tiny": dict(vocab_size=512, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                 seq=64, micro_batch=2),
}
CLIP_GRAD = 1.0
ADAM_BYTES_PER_PARAM = 30  # read the fp32 grad, read + write the fp32 master, m and v, write the bf16 copy
GB = 1e9


@dataclass(frozen=True)
class Shape:
    tokens: int  # T = micro batch x sequence
    hidden: int  # h
    ffn: int  # f, per expert
    experts: int  # E
    topk: int  # K
    vocab: int  # V
    layers: int  # L
    params: int  # P, trainable parameter elements


def build_config(name: str, chunk_size: int, fused: bool) -> tuple[ModelConfig, ExecutionConfig, int, int]:
    shape = dict(SHAPES[name])
    seq, micro_batch = shape.pop("seq"), shape.pop("micro_batch")
    config = ModelConfig(
        **shape, max_position_embeddings=seq, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
        add_bias_linear=False, untie_embeddings_and_output_weights=True,
        num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
    )
    execution = ExecutionConfig(params_dtype=torch.bfloat16, cross_entropy_chunk_size=chunk_size, fused_kernels=fused)
    return config, execution, seq, micro_batch


def minimum_bytes(s: Shape, a: int = 2) -> dict[str, int]:
    """The non-GEMM bytes of a step in which every kernel is one pass: each activation written once
    and read once, parameters, gradients and optimizer state touched once, ``a`` bytes per
    activation element (bf16).  GEMMs and attention are not counted (their inputs and outputs are
    theirs), so the weight-gradient GEMM is taken to write the fp32 main grad itself.

    Per layer, with T tokens, h hidden, f expert ffn, K experts per token (element counts):
      forward   input norm 2Th, RoPE on q and k 4Th, residual add 3Th, post norm 2Th,
                dispatch (T rows to K*T slots) (1 + K)Th, SwiGLU 3KTf, combine (K*T slots to T
                rows, weighted) (K + 1)Th, residual add 3Th
      backward  each norm with its residual-gradient add 4Th (twice), RoPE 4Th, SwiGLU 5KTf,
                dispatch (sum of K slot gradients) (K + 1)Th, combine (slot gradients and the
                weights' gradient) (2K + 1)Th
      router    softmax / top-k / losses on fp32 [T, E] logits, forward and backward: 4TE x 4 bytes
    Once: embedding gather 2Th and its gradient 2Th, final norm 2Th + 3Th, cross entropy reading
    the bf16 logits once and writing their gradient once 2TV.
    Optimizer: 30 bytes per parameter (``ADAM_BYTES_PER_PARAM``).  Gradient buffers: nothing
    (the main grads are the GEMMs' outputs; no reduction at world size 1).
    """
    T, h, f, K, E = s.tokens, s.hidden, s.ffn, s.topk, s.experts
    forward = (2 + 4 + 3 + 2 + (1 + K) + (K + 1) + 3) * T * h + 3 * K * T * f
    backward = (4 + 4 + 4 + (K + 1) + (2 * K + 1)) * T * h + 5 * K * T * f
    per_layer = (forward + backward) * a + 4 * T * E * 4
    once = (2 + 2 + 2 + 3) * T * h * a + 2 * T * s.vocab * a
    return {
        "elementwise": s.layers * per_layer + once,
        "comm": 0,
        "optimizer": ADAM_BYTES_PER_PARAM * s.params,
    }


def _host_value(slots_per_expert: int, parts: int):
    """The answer to a host read: the dispatcher's split sizes (integers) are T * K / E each; the
    grad-norm table (floats: per part its sum of squares and max, then the non-finite flags) holds
    4 / parts per part, so the L2 norm is 2, and no flag."""

    def answer(t: torch.Tensor):
        if not t.dtype.is_floating_point:
            return [slots_per_expert] * t.numel()
        assert t.numel() == 2 * (parts + 1), "the grad-norm table of one rank: (parts + flags) x 2"
        return [4.0 / parts] * (2 * parts) + [0.0, 0.0]

    return answer


def count_step(shape_name: str, chunk_size: int, fused: bool = True) -> tuple[TrafficCounter, Shape, dict]:
    """Run one training step at ``shape_name`` on the meta device under a ``TrafficCounter``;
    ``fused``: megamoe's Triton kernels where CUDA would run them (Triton importable)."""
    config, execution, seq, micro_batch = build_config(shape_name, chunk_size, fused)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            return _count_step(config, execution, seq, micro_batch)
        finally:
            dist.destroy_process_group()


def _count_step(config: ModelConfig, execution: ExecutionConfig, seq: int, micro_batch: int):
    layout = initialize_model_parallel(ParallelConfig(), config.experts_by_layer())
    cuda_answer = adam_module.FusedSupport(runs=True, applies_grad_scale=True)
    fused_devices = [*_get_fused_kernels_supported_devices(), "meta"]
    with mock.patch.object(adam_module, "fused_adamw_support", lambda device, cls=None: cuda_answer), \
            mock.patch.object(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: fused_devices), \
            kernels.forced():
        device = torch.device("meta")
        model = GPTModel(config, layout, execution, device=device)
        optimizer = MixedPrecisionOptimizer(
            model, OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=CLIP_GRAD, params_dtype=torch.bfloat16), layout
        )
        tokens = micro_batch * seq
        params = sum(p.numel() for p in model.parameters())
        shape = Shape(tokens=tokens, hidden=config.hidden_size, ffn=config.moe_ffn_hidden_size,
                      experts=config.num_experts[0], topk=config.moe_router_topk, vocab=config.vocab_size,
                      layers=config.num_layers, params=params)
        slots_per_expert, rest = divmod(tokens * shape.topk, shape.experts)
        assert rest == 0, "balanced routing needs T * K divisible by E"
        parts = len(optimizer.buffers)
        counters = [TrafficCounter(grad_buffers=[b.main_grad for b in optimizer.buffers],
                                   host_value=_host_value(slots_per_expert, parts)) for _ in range(2)]
        warmup, counter = counters
        metrics = IntervalMetrics(layout=layout, device=device, flops_per_token=0.0, peak_tflops=None)
        batch = {k: torch.zeros(micro_batch, seq, dtype=torch.long) for k in ("tokens", "labels")}
        batch["loss_mask"] = torch.ones(micro_batch, seq)
        # the first step also creates Adam's moments; the second, the steady state, is reported
        for c in counters:
            _phased(optimizer, c)
            with CudaKernels(c), c:
                result = train_step(model, optimizer, [batch], metrics, device)
        assert not result.skipped and abs(result.grad_norm - 2.0) < 1e-6, result
        notes = {"adam": optimizer.adam_kind, "clip_in_adam": optimizer.clip_in_adam,
                 "fused_kernels": execution.fused_kernels and kernels.available(),
                 "buffers": [b.reduction.name for b in optimizer.buffers]}
    return counter, shape, notes


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FusedRMSNorm(torch.autograd.Function):
    """``F.rms_norm`` counted as CUDA's fused kernels (see the module docstring); computes nothing
    (meta tensors)."""

    @staticmethod
    def forward(ctx, x, weight, eps, counter: TrafficCounter):
        with counter.suppressed():
            y = torch.empty_like(x)
        rows = x.numel() // x.shape[-1]
        ctx.counter, ctx.rstd_bytes = counter, rows * 4
        ctx.save_for_backward(x, weight)
        counter.record("_fused_rms_norm", read=_nbytes(x, weight), written=_nbytes(y) + ctx.rstd_bytes)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        with ctx.counter.suppressed():
            dx, dw = torch.empty_like(x), torch.empty_like(weight)
        ctx.counter.record("_fused_rms_norm_backward", read=_nbytes(dy, x, weight) + ctx.rstd_bytes,
                           written=_nbytes(dx, dw))
        return dx, dw, None, None


class CudaKernels(TorchFunctionMode):
    """The ops whose CUDA kernel is not what a CPU build of torch runs on meta, replaced by it:
    ``F.scaled_dot_product_attention`` (causal, no dropout or mask) by the flash kernel's op, whose
    first output is the attention output, and ``F.rms_norm`` by ``FusedRMSNorm``."""

    def __init__(self, counter: TrafficCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            assert kwargs.get("is_causal") and not kwargs.get("dropout_p") and not kwargs.get("enable_gqa"), kwargs
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
        if func in (F.rms_norm, torch.rms_norm):
            names = ("input", "normalized_shape", "weight", "eps")
            bound = {**dict(zip(names, args)), **kwargs}
            x, shape, weight, eps = (bound.get(n) for n in names)
            assert len(shape) == 1 and weight is not None, "the bench models a RMSNorm over the last dim with a weight"
            return FusedRMSNorm.apply(x, weight, eps, self.counter)
        return func(*args, **kwargs)


def _phased(optimizer: MixedPrecisionOptimizer, counter: TrafficCounter) -> None:
    """Count the optimizer's parts under their own phases (instance attributes shadow the methods,
    and ``step`` calls ``self.finish_grad_sync``)."""
    for method, phase in (("zero_grad", "grad-buffers"), ("finish_grad_sync", "grad-buffers"), ("step", "optimizer")):
        bound = getattr(type(optimizer), method).__get__(optimizer)

        def wrapper(*args, _bound=bound, _phase=phase, **kwargs):
            with counter.phase(_phase):
                return _bound(*args, **kwargs)

        setattr(optimizer, method, wrapper)


def summarize(counter: TrafficCounter) -> dict[str, dict[str, int]]:
    """Bytes (read, written) and launches per reported category: ``gemm`` (GEMMs and attention,
    forward and backward), ``elementwise`` (every other op of forward and backward), ``comm``
    (zeroing, accumulating into and reducing the main grads, collectives), ``optimizer`` (grad
    norm, clipping, AdamW, copy to the parameters)."""
    out = {k: {"read": 0, "written": 0, "launches": 0} for k in ("gemm", "elementwise", "comm", "optimizer")}
    for (phase, category, _), c in counter.counts.items():
        if category == "host":
            continue
        if category == "comm" or phase == "grad-buffers":
            key = "comm"
        elif phase == "optimizer":
            key = "optimizer"
        else:
            key = "gemm" if category == "gemm" else "elementwise"
        out[key]["read"] += c.read
        out[key]["written"] += c.written
        out[key]["launches"] += c.launches
    return out


def top_ops(counter: TrafficCounter, n: int) -> list[tuple[str, float, int, int]]:
    """The ``n`` non-GEMM (phase, op) pairs moving the most bytes: (name, GB, launches, calls)."""
    merged = defaultdict(lambda: [0, 0, 0])
    for (phase, category, name), c in counter.counts.items():
        if category in ("gemm", "host"):
            continue
        m = merged[f"{phase}:{name}"]
        m[0] += c.total
        m[1] += c.launches
        m[2] += c.calls
    ranked = sorted(merged.items(), key=lambda kv: -kv[1][0])[:n]
    return [(name, b / GB, launches, calls) for name, (b, launches, calls) in ranked]


def report(shape_name: str, chunk_size: int, counter: TrafficCounter, shape: Shape, notes: dict) -> dict:
    summary = summarize(counter)
    minimum = minimum_bytes(shape)
    non_gemm = sum(summary[k]["read"] + summary[k]["written"] for k in ("elementwise", "comm", "optimizer"))
    minimum_total = sum(minimum.values())
    return {
        "shape": shape_name,
        "tokens": shape.tokens,
        "params": shape.params,
        "cross_entropy_chunk_size": chunk_size,
        "adam": notes["adam"],
        "clip_in_adam": notes["clip_in_adam"],
        "fused_kernels": notes["fused_kernels"],
        "host_reads": counter.host_reads,
        "categories": {k: {**v, "minimum": minimum.get(k)} for k, v in summary.items()},
        "non_gemm_bytes": non_gemm,
        "non_gemm_minimum": minimum_total,
        "ratio": non_gemm / minimum_total,
        "launches": sum(v["launches"] for v in summary.values()),
        "top_ops": top_ops(counter, 15),
        "ops": {f"{phase}:{category}:{name}": [c.read, c.written, c.launches, c.calls]
                for (phase, category, name), c in sorted(counter.counts.items())},
    }


def print_report(r: dict) -> None:
    unit, scale = ("GB", GB) if r["tokens"] >= 4096 else ("MB", 1e6)
    print(f"one training step, {r['shape']}: {r['tokens']:,} tokens, {r['params']:,} parameters, bf16 params, "
          f"fp32 main grads and masters, clip {CLIP_GRAD}, --cross-entropy-chunk-size {r['cross_entropy_chunk_size']}")
    print(f"counted eagerly on the meta device at world size 1 (no gradient collective runs: "
          f"DP 1); balanced routing (T*K/E slots per expert); CUDA's flash attention and fused RMSNorm; {r['adam']} "
          f"(clip in Adam: {r['clip_in_adam']}); {r['host_reads']} host reads")
    fused = "megamoe's Triton kernels (SwiGLU, RoPE, cross entropy, MoE combine)" if r["fused_kernels"] else \
        "no Triton kernels (--no-fused-kernels, or Triton not installed)"
    print(f"path counted: {fused}")
    print(f"{'category':<24}{unit + ' read':>10}{unit + ' written':>12}{unit + ' total':>10}{'launches':>10}{'minimum ' + unit:>12}"
          f"{'ratio':>8}")
    labels = {"gemm": "GEMM + attention", "elementwise": "elementwise + copy", "comm": "grad buffers + comm",
              "optimizer": "optimizer"}
    for key, label in labels.items():
        c = r["categories"][key]
        total = c["read"] + c["written"]
        minimum = c["minimum"]
        min_text = "" if minimum is None else f"{minimum / scale:.2f}"
        ratio = "" if not minimum else f"{total / minimum:.2f}"
        print(f"{label:<24}{c['read'] / scale:>10.2f}{c['written'] / scale:>12.2f}{total / scale:>10.2f}{c['launches']:>10,}"
              f"{min_text:>12}{ratio:>8}")
    print(f"{'non-GEMM total':<24}{'':>10}{'':>12}{r['non_gemm_bytes'] / scale:>10.2f}{'':>10}"
          f"{r['non_gemm_minimum'] / scale:>12.2f}{r['ratio']:>8.2f}")
    print(f"kernel launches per step: {r['launches']:,}")
    print(f"largest non-GEMM ops (phase:op  {unit}  launches  calls):")
    for name, gb, launches, calls in r["top_ops"]:
        print(f"  {name:<52}{gb * GB / scale:>9.2f}{launches:>9,}{calls:>8,}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="moe-1b-4e")
    parser.add_argument("--cross-entropy-chunk-size", type=int, default=None,
                        help="the model's --cross-entropy-chunk-size (default: what it is on CUDA when not given)")
    parser.add_argument("--no-fused-kernels", action="store_true",
                        help="count the plain PyTorch ops, not megamoe's Triton kernels (counted when Triton imports)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args(argv)
    chunk = ExecutionConfig(cross_entropy_chunk_size=args.cross_entropy_chunk_size).cross_entropy_chunk_for(
        torch.device("cuda"))
    counter, shape, notes = count_step(args.shape, chunk, fused=not args.no_fused_kernels)
    r = report(args.shape, chunk, counter, shape, notes)
    if args.json:
        print(json.dumps(r))
    else:
        print_report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
