"""Training does not depend on the layout: for EP 1/2/4, TP 1/2, ZeRO-1 on/off and models with two
EP sizes (also under ZeRO-1 at TP 2, and TP 2 with EP 4 on 8 ranks), the loss and grad norm (L2,
inf) of every step and the final full parameters match a single-process fp32 reference (plain
torch AdamW + clip_grad_norm_), with clipping active.

Tolerances, relative, with the largest error measured over these layouts in brackets: loss and L2
norm 3e-6 [1.9e-6]; the inf norm is one gradient element, not a sum, and from step 2 on it
carries the parameters' own differences: 8e-6 [4.6e-6]; parameters: ``assert_params_close``
with rtol 3e-6 (its per-element floor, 0.8% of an Adam step, dominates).  (Before the router had
its learned bias: 4.4e-7, 2.3e-6 and 0.13% of a step; see RTOL.)

The 4-rank layouts run in one launch (spawning costs more than the steps); the reference is
computed once per rank.  Layout tuples: (TP, EP per MoE layer, ZeRO-1, bucket size[, cross-entropy
chunk size]).  Small
buckets put several buckets (and bucket padding) in every buffer.
"""

import pytest
import torch

from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.tiny_moe import HYPER, assert_params_close, assert_replicas_identical, build, reference_run, train

STEPS = 4
LAYOUTS = [
    (1, (1, 1), False, 40_000_000),
    (1, (1, 1), True, 5_000),
    (1, (2, 2), False, 5_000),
    (1, (2, 2), True, 40_000_000),
    (1, (4, 4), False, 40_000_000),
    (1, (4, 4), True, 5_000),
    (2, (1, 1), False, 5_000),
    (2, (1, 1), True, 40_000_000),
    (2, (2, 2), False, 40_000_000),
    (2, (2, 2), True, 5_000),
    (1, (4, 2), False, 40_000_000),
    (1, (4, 2), True, 5_000),
    (2, (2, 1), True, 5_000),
    # --cross-entropy-chunk-size 5 and 7 (16 tokens per micro-batch): the reference takes the plain path.
    (2, (2, 2), True, 5_000, 5),
    (1, (4, 2), False, 40_000_000, 7),
]
LAYOUTS_8 = [(2, (4, 4), False, 5_000), (2, (4, 2), True, 5_000)]  # 2 steps: 8 ranks on few cores
# Measured over these layouts: 1.9e-6 (L2 norm, TP 2) and 4.6e-6 (inf norm); 3e-7 and 2.3e-6
# before the router had its learned bias (Megatron's, with linear biases on).  That bias's
# gradient is a sum of terms that nearly cancel, and Adam moves each element by about lr
# whatever its size, so last-bit differences of the reduction order reach the routing.
RTOL = 3e-6
INF_RTOL = 8e-6


def _close(got, want, what, rtol=RTOL):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=0, msg=lambda m: f"{what}: {m}")


def _train_and_compare(model, opt, steps, ref, where):
    """Train ``steps`` steps; loss, both norms, the final parameters and the replicas must match
    ``ref``."""
    got = train(model, opt, steps)
    _close(got["loss"], ref["loss"], f"{where} loss")
    _close(got["l2"], ref["l2"], f"{where} L2 grad norm")
    _close(got["inf"], ref["inf"], f"{where} inf grad norm", INF_RTOL)
    assert not any(got["skipped"])
    assert_params_close(gather_full_state(model, model.layout), ref["params"], where, rtol=RTOL)
    assert_replicas_identical(model)


def _layouts_body(rank, world, layouts, steps=STEPS):
    ref = reference_run(steps)
    assert all(n > HYPER["clip_grad"] * 1.5 for n in ref["l2"]), f"clipping must be active: {ref['l2']}"
    for tp, eps, zero, bucket, *chunk in layouts:
        where = f"TP={tp} EP={eps} ZeRO={zero} bucket={bucket} CE chunk={chunk}"
        execution = dict(cross_entropy_chunk_size=chunk[0]) if chunk else None
        model, opt = build(tp, eps, zero=zero, bucket_size=bucket, execution=execution)
        _train_and_compare(model, opt, steps, ref, where)


@pytest.mark.timeout(300)
def test_loss_norm_and_params_match_single_process_reference_in_every_layout():
    run_distributed(_layouts_body, 4, LAYOUTS, timeout=280)


@pytest.mark.timeout(300)
def test_tensor_parallel_2_with_expert_parallel_4_on_8_ranks_matches_the_reference():
    run_distributed(_layouts_body, 8, LAYOUTS_8, 2, timeout=280)


# Grouped-query attention (2 KV heads for 4 query heads), QK-norm, sigmoid scores with an expert
# bias that moves every step: the same training in every layout, bias included.
ARCH = dict(group_query_attention=True, num_query_groups=2, qk_layernorm=True, moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.05)
ARCH_STEPS = 8
ARCH_LAYOUTS = {  # world size -> (TP, EP per MoE layer, ZeRO-1[, ETP with --sequence-parallel])
    4: [(1, (1, 1), False), (2, (2, 2), True), (1, (4, 2), True), (2, (4, 2), True, 1)],
    8: [(2, (4, 4), False), (1, (4, 2), True)],
}


def _reference_body(rank, world):
    return reference_run(ARCH_STEPS, arch=ARCH)


def _arch_layouts_body(rank, world, ref):
    for tp, eps, zero, *sequence_parallel in ARCH_LAYOUTS[world]:
        etp = sequence_parallel[0] if sequence_parallel else None
        where = f"world={world} TP={tp} EP={eps} ZeRO={zero} SP={bool(sequence_parallel)} ETP={etp}"
        model, opt = build(tp, eps, zero=zero, arch=ARCH, sequence_parallel=bool(sequence_parallel), etp=etp)
        got = train(model, opt, ARCH_STEPS)
        _close(got["loss"], ref["loss"], f"{where} loss")
        _close(got["l2"], ref["l2"], f"{where} L2 grad norm")
        for step, (g, w) in enumerate(zip(got["bias"], ref["bias"], strict=True)):
            torch.testing.assert_close(g, w, rtol=RTOL, atol=0, msg=lambda m: f"{where} expert bias, step {step}: {m}")


@pytest.fixture(scope="module")
def arch_reference():
    (ref,) = run_distributed(_reference_body, 1)
    assert ref["bias"][-1].abs().sum() > 0, "the expert bias must move"
    return ref


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [4, 8])
def test_gqa_qk_norm_sigmoid_expert_bias_train_alike_in_every_layout(world, arch_reference):
    run_distributed(_arch_layouts_body, world, arch_reference, timeout=280)


# Sequence parallelism and MoE parallel folding, 8 steps: (world, TP, EP per MoE layer, ETP, ZeRO-1).
# ETP None is the default (= TP); ETP 1 folds EP over TP x DP.  Learned absolute positions: each
# TP rank adds the positions of its part of the sequence.
SP_STEPS = 8
SP_ARCH = dict(position_embedding_type="learned_absolute")
SP_LAYOUTS = {
    4: [
        (2, (2, 2), None, True),
        (2, (4, 4), 1, True),
        (2, (4, 2), 1, True),
        (2, (4, 2), 1, False),
        (2, (4, 2), 1, True, 6),  # --cross-entropy-chunk-size 6 over the sequence all-gathered for the output layer
    ],
    8: [
        (2, (2, 2), None, True),
        (2, (4, 4), 1, True),
        (2, (2, 4), 1, True),
        (2, (4, 2), 1, False),
    ],
}


def _sequence_parallel_body(rank, world):
    ref = reference_run(SP_STEPS, arch=SP_ARCH)
    for tp, eps, etp, zero, *chunk in SP_LAYOUTS[world]:
        where = f"world={world} TP={tp} SP EP={eps} ETP={etp or tp} ZeRO={zero} CE chunk={chunk}"
        execution = dict(cross_entropy_chunk_size=chunk[0]) if chunk else None
        model, opt = build(tp, eps, zero=zero, arch=SP_ARCH, execution=execution, sequence_parallel=True, etp=etp,
                           bucket_size=5_000)
        _train_and_compare(model, opt, SP_STEPS, ref, where)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [4, 8])
def test_sequence_parallel_and_expert_tensor_parallel_match_single_process_reference(world):
    run_distributed(_sequence_parallel_body, world, timeout=280)


# Multi-latent attention (q-lora, latent norms, YaRN) and two MTP depths after the last layer (an
# MoE layer, so the MTP blocks are MoE too), with sigmoid scores and a moving expert bias: the main
# and MTP losses, the grad norm and the biases of every step match TP 1 EP 1, with TP 2 under
# sequence parallelism (MLA's replicated down projections and the shared RoPE key, MTP's
# row-parallel eh_proj) and EP 4 over two EP sizes.
MLA_ARCH = dict(ARCH, group_query_attention=False, num_query_groups=None, multi_latent_attention=True, q_lora_rank=8,
                kv_lora_rank=10, qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=10, rotary_scaling_factor=4.0,
                original_max_position_embeddings=4, mscale_all_dim=0.7, mtp_num_layers=2, mtp_loss_scaling_factor=0.3)
MLA_LAYOUTS = [(2, (2, 2), False, None), (2, (2, 2), True, None), (2, (4, 2), True, 1)]


def _mla_mtp_body(rank, world):
    ref = reference_run(ARCH_STEPS, arch=MLA_ARCH)
    assert len(ref["mtp"]) == ARCH_STEPS and ref["bias"][-1].abs().sum() > 0
    for tp, eps, zero, etp in MLA_LAYOUTS:
        sequence_parallel = tp > 1 and (zero or etp is not None)
        where = f"MLA+MTP TP={tp} SP={sequence_parallel} EP={eps} ETP={etp or tp} ZeRO={zero}"
        model, opt = build(tp, eps, zero=zero, arch=MLA_ARCH, sequence_parallel=sequence_parallel, etp=etp)
        got = train(model, opt, ARCH_STEPS)
        _close(got["loss"], ref["loss"], f"{where} loss")
        _close(got["mtp"], ref["mtp"], f"{where} MTP loss")
        _close(got["l2"], ref["l2"], f"{where} L2 grad norm")
        for step, (g, w) in enumerate(zip(got["bias"], ref["bias"], strict=True)):
            torch.testing.assert_close(g, w, rtol=RTOL, atol=0, msg=lambda m: f"{where} expert bias, step {step}: {m}")


@pytest.mark.timeout(300)
def test_multi_latent_attention_and_mtp_train_alike_in_every_layout():
    run_distributed(_mla_mtp_body, 4, timeout=280)
