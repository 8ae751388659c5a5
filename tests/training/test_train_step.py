"""The trainer's step under a loss scale (fp16 and bf16 with a static --loss-scale) computes the
gradients of the fp32 step, MoE auxiliary and z losses included: both are inside the scaled loss,
so the one unscale in the optimizer brings them back.  The router's gradient is where a loss added
outside the scale would show (it would be divided by the scale): the test first checks that the
aux and z losses make a large part of it.

Tolerances (measured in brackets): the low-precision model rounds every weight and activation
(bf16 u = 2^-8, fp16 2^-11).  Router gradient, relative to fp32: fp16 5e-3 [5e-4], bf16 0.2
[6e-2]; grad norm: fp16 1e-3 [3e-5], bf16 1e-2 [2e-3].  The MoE losses make nearly all of the
router gradient here (coefficients 1.0 and 0.1), so a loss left outside the scale would miss by
about 1.
"""

import torch

from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.training.metrics import IntervalMetrics
from megamoe.training.trainer import train_step
from tests.harness import run_distributed
from tests.tiny_moe import HYPER, build_model, local_micro_batches, model_config

MOE_LOSSES = dict(moe_aux_loss_coeff=1.0, moe_z_loss_coeff=0.1)
RUNS = {  # name: (params dtype, static loss scale, MoE loss coefficients)
    "fp32": (torch.float32, None, MOE_LOSSES),
    "fp32 without MoE losses": (torch.float32, None, dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)),
    "fp16 scale 4096": (torch.float16, 4096.0, MOE_LOSSES),
    "bf16 scale 4096": (torch.bfloat16, 4096.0, MOE_LOSSES),
}
ROUTERS = ("layers.0.mlp.router.weight", "layers.2.mlp.router.weight")


def _body(rank, world):
    out = {}
    for name, (dtype, scale, losses) in RUNS.items():
        model = build_model(model_config(**losses), 1, (2,), dtype=dtype)
        cfg = OptimizerConfig(**{**HYPER, "clip_grad": 0.0, "params_dtype": dtype, "loss_scale": scale})
        opt = MixedPrecisionOptimizer(model, cfg, model.layout)
        batches = [{"tokens": t, "labels": l, "loss_mask": torch.ones(t.shape)}
                   for t, l in local_micro_batches(0, model.layout)]
        metrics = IntervalMetrics(layout=model.layout, device=torch.device("cpu"), flops_per_token=0.0,
                                  peak_tflops=None)
        result = train_step(model, opt, batches, metrics, torch.device("cpu"))
        params = dict(model.named_parameters())
        out[name] = (result.grad_norm, torch.cat([params[r].main_grad.double().reshape(-1) for r in ROUTERS]))
    return out


def test_loss_scaled_step_matches_the_fp32_step_with_moe_losses():
    out = run_distributed(_body, 2)[0]
    norm32, router32 = out["fp32"]
    _, router_without = out["fp32 without MoE losses"]
    share = ((router32 - router_without).norm() / router32.norm()).item()
    for name, router_tol, norm_tol in (("fp16 scale 4096", 5e-3, 1e-3), ("bf16 scale 4096", 0.2, 1e-2)):
        norm, router = out[name]
        err = ((router - router32).norm() / router32.norm()).item()
        assert share > 3 * router_tol, f"the MoE losses must be a visible part of the router gradient ({share})"
        assert err <= router_tol, f"{name}: router gradient off by {err:.1e} relative (MoE losses outside the loss scale?)"
        assert abs(norm - norm32) <= norm_tol * norm32, (name, norm, norm32)


def _skipped_step_body(rank, world):
    config = model_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                          moe_router_bias_update_rate=0.01)
    model = build_model(config, 1, (2,), dtype=torch.float16)
    layout = model.layout
    # 2^40 overflows fp16's backward: the first step is skipped by the loss scaler
    cfg = OptimizerConfig(**{**HYPER, "params_dtype": torch.float16, "initial_loss_scale": 2.0**40})
    opt = MixedPrecisionOptimizer(model, cfg, layout)
    metrics = IntervalMetrics(layout=layout, device=torch.device("cpu"), flops_per_token=0.0, peak_tflops=None)
    batches = lambda step: [{"tokens": t, "labels": l, "loss_mask": torch.ones(t.shape)}  # noqa: E731
                            for t, l in local_micro_batches(step, layout)]
    biases = lambda: torch.cat([b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")])  # noqa: E731
    before = biases()
    assert train_step(model, opt, batches(0), metrics, torch.device("cpu")).skipped
    after_skip = biases()
    opt.scaler.scale = 2.0**8
    assert not train_step(model, opt, batches(1), metrics, torch.device("cpu")).skipped
    after_step = biases()
    return before, after_skip, after_step


def test_the_expert_bias_does_not_move_on_a_step_the_loss_scaler_skipped():
    for before, after_skip, after_step in run_distributed(_skipped_step_body, 2):
        assert before.numel() > 0
        assert torch.equal(after_skip, before), "the expert bias moved on a skipped step"
        assert not torch.equal(after_step, before), "the expert bias must move on an applied step"


def _global_aux_body(rank, world):
    """Two steps of ``global_aux_loss`` at DP 2: each step's counts start afresh (the trainer
    calls ``start_step``) and hold the step's micro-batches of both ranks."""
    from megamoe.model.moe.router import TopKRouter

    model = build_model(model_config(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1))
    layout = model.layout
    opt = MixedPrecisionOptimizer(model, OptimizerConfig(**HYPER), layout)
    metrics = IntervalMetrics(layout=layout, device=torch.device("cpu"), flops_per_token=0.0, peak_tflops=None)
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    seen = []
    for step in range(2):
        batches = [{"tokens": t, "labels": l, "loss_mask": torch.ones(t.shape)} for t, l in local_micro_batches(step, layout)]
        train_step(model, opt, batches, metrics, torch.device("cpu"))
        seen.append((router.step_micro_batches, router.step_counts.sum().item(), len(batches)))
    return seen


def test_global_aux_loss_counts_start_afresh_every_step_and_cover_every_dp_rank():
    from tests.tiny_moe import SEQ

    for per_step in run_distributed(_global_aux_body, 2):
        for micro_batches, counted, local_batches in per_step:
            assert micro_batches == local_batches
            assert counted == local_batches * 2 * SEQ * 2, "each micro-batch's top-2 slots of both DP ranks"
