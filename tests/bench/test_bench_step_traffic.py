"""bench/bench_step_traffic.py runs a real training step at the tiny shape on the meta device and
its figures hold what the code does: every parameter's gradient is copied once into its fp32
main grad (no zeroing pass, no 1/DP scale at DP 1), fused AdamW touches 28 bytes per parameter,
the step syncs with the host once per MoE layer and once for the grad norm, the fewer-pass
levers leave no trace of the ops they replaced, and the count is above the analytic minimum.
With Triton installed the fused kernels are counted (as on CUDA), each as one launch reading
exactly its inputs and writing its outputs, and ``--no-fused-kernels`` counts the plain ops.
The bench prints the figures (run as a script, as a user would); this only checks them."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the bench's tiny shape: vocabulary 512 (no padding at TP 1), 2 layers, hidden 64, 4 experts of ffn 96
VOCAB, LAYERS, HIDDEN, FFN, EXPERTS = 512, 2, 64, 96, 4
BATCH, SEQ, HEADS, TOPK = 2, 64, 4, 2


def _run(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_step_traffic.py"), "--shape", "tiny", "--json",
                          *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_step_traffic_figures_follow_the_code():
    r = _run("--cross-entropy-chunk-size", "0")
    per_layer = 2 * HIDDEN + 4 * HIDDEN * HIDDEN + EXPERTS * HIDDEN + EXPERTS * 3 * HIDDEN * FFN
    params = 2 * VOCAB * HIDDEN + LAYERS * per_layer + HIDDEN
    assert r["params"] == params
    ops = r["ops"]
    # gradient buffers: one copy of each bf16 gradient into fp32, nothing at zero_grad or sync
    copies = ops["backward:comm:copy_"]
    assert copies[:2] == [2 * params, 4 * params], copies
    assert not [k for k in ops if k.startswith("grad-buffers:")], "zero_grad or the DP-1 sync moved bytes"
    # fused AdamW reads param, grad, m, v and writes param, m, v: 28 B per element (+ its step counters)
    read, written = ops["optimizer:other:_fused_adamw_"][:2]
    assert 16 * params <= read <= 16 * params + 1024 and written == 12 * params
    assert r["host_reads"] == LAYERS + 1, "one split-size read per MoE layer and the grad norm's"
    # the replaced compositions are gone: zero + scatter of the combine, the stack of q/k/v gradients,
    # RoPE's negated half, and the fp32 copies of the logits and of their gradient (6 B per logit)
    assert "forward:other:index_copy" not in ops and "backward:other:stack" not in ops
    assert "forward:other:neg" not in ops
    logits = r["tokens"] * VOCAB
    assert all(sum(ops[f"{phase}:other:_to_copy"][:2]) < 6 * logits for phase in ("forward", "backward"))
    cats = r["categories"]
    assert all(cats[k]["read"] > 0 and cats[k]["written"] > 0 and cats[k]["launches"] > 0 for k in cats)
    assert r["non_gemm_bytes"] == sum(cats[k]["read"] + cats[k]["written"] for k in ("elementwise", "comm", "optimizer"))
    assert 1.0 < r["ratio"] < 3.0, r["ratio"]
    assert r["launches"] == sum(c["launches"] for c in cats.values())


def test_chunked_lm_head_costs_little_traffic():
    # the plain ops: with the fused cross entropy the tiny step's logits cost so little that the fp32
    # weight-gradient sums of the chunks (4 x vocab x hidden) stand out beside them
    plain = _run("--cross-entropy-chunk-size", "0", "--no-fused-kernels")
    chunked = _run("--cross-entropy-chunk-size", "32", "--no-fused-kernels")  # 4 chunks of the 128 tokens
    assert chunked["cross_entropy_chunk_size"] == 32
    assert chunked["non_gemm_bytes"] <= 1.1 * plain["non_gemm_bytes"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton (the gpu extra) is not installed")
def test_fused_kernels_are_counted_as_one_kernel_each():
    r = _run("--cross-entropy-chunk-size", "0")
    plain = _run("--cross-entropy-chunk-size", "0", "--no-fused-kernels")
    assert r["fused_kernels"] and not plain["fused_kernels"]
    ops, bf16 = r["ops"], 2
    slots, tokens = BATCH * SEQ * TOPK, BATCH * SEQ  # balanced routing: every slot is computed
    # [read, written, launches, calls] of each phase, over the layers
    assert ops["forward:other:swiglu"] == [LAYERS * slots * 2 * FFN * bf16, LAYERS * slots * FFN * bf16, LAYERS, LAYERS]
    assert ops["backward:other:swiglu_backward"] == [LAYERS * slots * 3 * FFN * bf16, LAYERS * slots * 2 * FFN * bf16,
                                                     LAYERS, LAYERS]
    head_dim = HIDDEN // HEADS
    q_bytes, table_bytes = tokens * HIDDEN * bf16, SEQ * head_dim * bf16  # k has as many heads as q here
    for phase in ("forward", "backward"):
        assert ops[f"{phase}:other:rotary"] == [2 * LAYERS * (q_bytes + 2 * table_bytes), 2 * LAYERS * q_bytes,
                                                2 * LAYERS, 2 * LAYERS]
    assert "forward:other:clone" not in ops, "RoPE's output layout made the attention output's reshape a copy"
    logits = tokens * VOCAB * bf16
    assert ops["forward:other:cross_entropy_stats"] == [logits + tokens * 8, 3 * tokens * 4, 1, 1]
    assert ops["backward:other:cross_entropy_logits_grad"][:2] == [logits + tokens * (8 + 4 + 4), logits]
    hidden_rows = slots * HIDDEN * bf16
    assert ops["forward:other:moe_combine"] == [LAYERS * (hidden_rows + slots * (4 + 8)),
                                                LAYERS * tokens * HIDDEN * bf16, LAYERS, LAYERS]
    assert ops["backward:other:moe_combine_backward"][:2] == [
        LAYERS * (tokens * HIDDEN * bf16 + hidden_rows + slots * (4 + 8)), LAYERS * (hidden_rows + slots * 4)]
    # the dispatch's backward: the K slot gradients of each token summed (the same kernel, no weights)
    assert ops["backward:other:moe_combine"] == [LAYERS * (hidden_rows + slots * 8), LAYERS * tokens * HIDDEN * bf16,
                                                 LAYERS, LAYERS]
    fused_names = ("swiglu", "rotary", "cross_entropy_stats", "moe_combine")
    assert not [k for k in plain["ops"] if k.split(":")[-1] in fused_names]
    assert r["non_gemm_bytes"] < plain["non_gemm_bytes"] and r["launches"] < plain["launches"]
