"""Pipeline parallelism trains exactly like PP 1: for each layout below, 8 steps through the
trainer's ``train_step`` (its 1F1B or interleaved schedule) give, at every step, the logged LM,
aux and z losses and the grad norm (L2 and inf) of the same layout at PP 1 to 1e-6, the same
expert biases, and afterwards the same parameters (to ``assert_params_close``'s floor), the same
``--log-params-norm`` and ``--log-num-zeros-in-grad`` figures, and the same evaluation loss
(``evaluate``, forward only through the schedule).  Clipping
is active at every step.

Each case is (name, world, TP, EP per MoE layer, ZeRO-1, pipeline flags, model fields, execution
fields, optimizer fields).  The model is ``tiny_moe.model_config`` (shared expert, TP-sharded and
replicated biases, tied embeddings unless a case unties them) with more layers, so that MoE and
dense layers fall on every stage.  PP 1 runs in the same world (the ranks PP takes go to DP).
Largest relative differences measured over these cases (fp32): LM loss 9e-8, aux loss 2.4e-7,
z loss 1.4e-7, L2 grad norm 2.5e-7, inf grad norm 2.1e-7 (summation order: the tied embedding's
two gradients meet in a collective rather than in one .grad, and the logged sums travel over PP).
"""

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel.gather import gather_full_state
from megamoe.training.trainer import evaluate
from tests.harness import run_distributed
from tests.tiny_moe import assert_params_close, assert_replicas_identical, build, local_micro_batches, train_logged

STEPS = 8
RTOL = 1e-6
PARAM_RTOL = 3e-6  # tests/optim/test_layout_invariance.py's
FOUR = dict(num_layers=4, moe_layer_freq=(1, 0, 1, 1))
BIAS = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.05)
CASES = {
    4: [
        ("PP 2, tied embeddings", 1, (1,), False, dict(pipeline_model_parallel_size=2), FOUR, {}, {}),
        ("PP 2 x EP 2, ZeRO-1, overlapped reduction, expert bias", 1, (2,), True,
         dict(pipeline_model_parallel_size=2), dict(FOUR, **BIAS), {}, dict(overlap_grad_reduce=True, bucket_size=3000)),
        ("PP 4 x 2 virtual stages, untied, full recomputation, overlapped reduction", 1, (1,), False,
         dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2),
         dict(num_layers=8, moe_layer_freq=(1, 0, 1, 1, 0, 1, 1, 1), untie_embeddings_and_output_weights=True),
         dict(recompute_granularity="full"), dict(overlap_grad_reduce=True, bucket_size=3000)),
        ("PP 4, uneven first and last stages", 1, (1,), False,
         dict(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=1),
         dict(num_layers=6, moe_layer_freq=(1, 0, 1, 1, 0, 1)), {}, {}),
        ("PP 2, EP 2 on the first stage and 1 on the second, ZeRO-1", 1, (2, 1, 1), True,
         dict(pipeline_model_parallel_size=2), FOUR, {}, {}),
        ("PP 2 x EP 2, two MTP depths (MoE) on the last stage, untied, expert bias", 1, (2,), False,
         dict(pipeline_model_parallel_size=2),
         dict(FOUR, **BIAS, mtp_num_layers=2, mtp_loss_scaling_factor=0.3, untie_embeddings_and_output_weights=True),
         {}, {}),
    ],
    8: [
        # micro-batches of 2: a stage's [b, s / TP, h] under SP is then a strided slice, sent contiguous
        ("PP 2 x TP 2 with SP x EP 2, ZeRO-1, micro-batches of 2", 2, (2,), True, dict(pipeline_model_parallel_size=2),
         dict(FOUR, position_embedding_type="learned_absolute"), {}, dict(micro_batch_size=2)),
    ],
}


def _close(got, want, what, rtol=RTOL):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=0, msg=lambda m: f"{what}: {m}")


def _run(tp, eps, zero, pipeline, arch, execution, optimizer):
    """Train ``STEPS`` steps, then evaluate (the trainer's ``evaluate``, forward only through the
    schedule at PP > 1) on two more global batches.  ``optimizer`` may also give the
    ``micro_batch_size`` (1 by default)."""
    optimizer = dict(optimizer)
    micro_batch_size = optimizer.pop("micro_batch_size", 1)
    model, opt = build(tp, eps, zero=zero, arch=arch, execution=execution, sequence_parallel=tp > 1,
                       pipeline=pipeline, **optimizer)
    out = train_logged(model, opt, STEPS, micro_batch_size=micro_batch_size)
    out["params_norm"], out["zeros"] = opt.params_norm(), opt.num_zeros_in_grad()  # --log-params-norm, ...zeros-in-grad
    batches = ([{"tokens": t, "labels": lab, "loss_mask": torch.ones(t.shape)}
                for t, lab in local_micro_batches(step, model.layout, micro_batch_size=micro_batch_size)]
               for step in (100, 101))
    # the schedule that trained, as the trainer evaluates
    out["eval"] = evaluate(model, batches, 2, torch.device("cpu"), pipeline=out.pop("pipeline"))
    return model, out


def _body(rank, world):
    worst = {}
    for name, tp, eps, zero, pipeline, arch, execution, optimizer in CASES[world]:
        ref_model, ref = _run(tp, eps, zero, {}, arch, execution, optimizer)
        assert all(n > 0.45 for n in ref["grad_norm"]), f"clipping (0.3) must be active: {ref['grad_norm']}"
        want = {k: v.clone() for k, v in gather_full_state(ref_model, ref_model.layout).items()}
        model, got = _run(tp, eps, zero, pipeline, arch, execution, optimizer)
        layout = model.layout
        assert layout.pp_size == pipeline["pipeline_model_parallel_size"]
        _close(got["eval"], ref["eval"], f"{name}: evaluation loss")
        _close(got["params_norm"], ref["params_norm"], f"{name}: params norm", rtol=PARAM_RTOL)
        assert got["zeros"] == ref["zeros"], f"{name}: zeros in the gradient {got['zeros']} != {ref['zeros']}"
        assert (got["mtp_loss"][0] is None) == (ref["mtp_loss"][0] is None) == (not arch.get("mtp_num_layers"))
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm", "grad_norm_inf") + ("mtp_loss",) * bool(
                arch.get("mtp_num_layers")):
            _close(got[key], ref[key], f"{name}: {key}")
            worst[key] = max(worst.get(key, 0.0), max(abs(g / w - 1) for g, w in zip(got[key], ref[key])))
        assert not any(got["skipped"])
        held = gather_full_state(model, layout)
        assert_params_close(held, {k: want[k] for k in held}, name, rtol=PARAM_RTOL)
        assert_replicas_identical(model)
        if layout.embedding_dp_group is not None and not arch.get("untie_embeddings_and_output_weights"):
            # the last stage's copies of a tied embedding stay the first stage's, bit for bit
            copies = [torch.empty_like(held["word_embeddings.weight"]) for _ in layout.embedding_dp_ranks]
            dist.all_gather(copies, held["word_embeddings.weight"], group=layout.embedding_dp_group)
            assert all(torch.equal(copies[0], copy) for copy in copies), name
        for step, (g, w) in enumerate(zip(got["bias"], ref["bias"], strict=True)):
            assert g.keys() <= w.keys() and (g or not arch.get("moe_router_enable_expert_bias"))
            for layer, bias in g.items():
                torch.testing.assert_close(bias, w[layer], rtol=PARAM_RTOL, atol=0,
                                           msg=lambda m: f"{name}: layer {layer}'s expert bias, step {step}: {m}")
    return worst


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [4, 8])
def test_pipeline_layouts_train_like_pp_1(world):
    worst = run_distributed(_body, world, timeout=560)
    print({k: f"{max(w[k] for w in worst):.1e}" for k in worst[0]})


def _loss_scale_body(rank, world):
    arch = dict(FOUR, moe_aux_loss_coeff=0.5)  # aux losses weigh on the routers' gradients
    runs = []
    for pipeline in ({}, dict(pipeline_model_parallel_size=2)):
        model, opt = build(1, (1,), zero=False, arch=arch, dtype=torch.bfloat16, pipeline=pipeline, loss_scale=4096.0)
        out = train_logged(model, opt, 3)
        out.pop("pipeline")
        runs.append(out)
    return runs


@pytest.mark.timeout(300)
def test_bf16_with_a_loss_scale_scales_every_stage_aux_loss_like_pp_1():
    """bf16 with a static loss scale of 4096: the aux losses of the first stage enter its backward
    with the loss scale too.  PP 2 and PP 1 agree to 1e-3 (bf16's own differences of summation
    order; measured: 3e-6 on the first step's grad norm, 2e-4 on the third's); an aux gradient
    that missed the loss scale moved the first step's grad norm by 1.1%."""
    (ref, got), _ = run_distributed(_loss_scale_body, 2, timeout=280)
    for key in ("lm_loss", "aux_loss"):
        _close(got[key], ref[key], f"bf16 PP 2: {key}", rtol=1e-3)
    _close(got["grad_norm"][:2], ref["grad_norm"][:2], "bf16 PP 2: grad norm", rtol=1e-3)


def _overlap_body(rank, world, virtual):
    from megamoe.training.pipeline import PipelineSchedule

    pipeline = dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=virtual)
    model, opt = build(1, (1,), zero=True, arch=FOUR, pipeline=pipeline, overlap_grad_reduce=True, bucket_size=3000)
    schedule = PipelineSchedule(model, opt, num_microbatches=8, micro_batch_size=1, seq_length=16,
                                device=torch.device("cpu"))
    opt.zero_grad()
    batches = [{"tokens": t, "labels": lab, "loss_mask": torch.ones(t.shape)}
               for t, lab in local_micro_batches(0, model.layout)]
    schedule.forward_backward(batches)
    return opt.grad_sync.launched, len(opt.grad_sync.order)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("virtual", [1, 2])
def test_overlapped_reduction_launches_every_bucket_during_the_last_micro_batch_backward(virtual):
    """With --overlap-grad-reduce the schedule's backwards of every micro-batch but the last only
    accumulate (a bucket launched earlier would raise), and the last one's launch every bucket
    before the schedule returns (several buckets per stage)."""
    for launched, buckets in run_distributed(_overlap_body, 2, virtual, timeout=280):
        assert buckets > 2 and launched == buckets
