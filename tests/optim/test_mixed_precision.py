"""bf16 / fp16 training follows the fp32 single-process reference, and an fp16 overflow on one
rank makes every rank skip the step and back the loss scale off.

Tolerances (measured errors in brackets, bf16 / fp16, on this 4-step run):
* the parameter dtype rounds every weight and activation: unit roundoff u = 2^-8 (bf16),
  2^-11 (fp16).  The loss averages the rounding over 128 tokens: rtol 1e-3 / 5e-4
  [9e-5 / 6e-5].  The L2 norm sums over all elements: rtol 2e-2 / 1e-2 [5e-3 / 2e-3].  The inf
  norm is one gradient element through a dozen rounded ops (~16 u bf16, ~40 u fp16): rtol
  6e-2 / 2e-2 [2e-2 / 7e-3].
* parameters: Adam's first steps move each element by about lr * sign(g), so an element whose
  gradient is below the precision's noise moves in a random direction: agreement is stated for
  the whole model, ||theta - theta_ref|| / ||theta_ref|| <= 2e-2 [7e-3 / 5e-3] (a few bf16
  roundings), and for the trajectory, ||dtheta - dtheta_ref|| / ||dtheta_ref|| <= 0.2
  [8e-2 / 5e-2] where dtheta is the total update of the 4 steps.
"""

import torch

from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.tiny_moe import build, forward_backward, reference_run, train

STEPS = 4
TOLERANCES = {  # loss, L2 norm, inf norm, whole-model params, total update
    torch.bfloat16: (1e-3, 2e-2, 6e-2, 2e-2, 0.2),
    torch.float16: (5e-4, 1e-2, 2e-2, 2e-2, 0.2),
}


def _flat(state: dict, names) -> torch.Tensor:
    return torch.cat([state[n].double().reshape(-1) for n in names])


def _max_rel(got, want) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def _precision_body(rank, world):
    ref = reference_run(STEPS)
    names = list(ref["params"])
    for dtype, (loss_tol, l2_tol, inf_tol, param_tol, update_tol) in TOLERANCES.items():
        for tp, eps, zero in ((1, (4, 2), True), (2, (2, 2), False)):
            where = f"{dtype} TP={tp} EP={eps} ZeRO={zero}"
            model, opt = build(tp, eps, zero=zero, dtype=dtype, initial_loss_scale=2.0**12)
            init = _flat(gather_full_state(model, model.layout), names)
            got = train(model, opt, STEPS)
            assert not any(got["skipped"]), where
            assert _max_rel(got["loss"], ref["loss"]) <= loss_tol, (where, got["loss"], ref["loss"])
            assert _max_rel(got["l2"], ref["l2"]) <= l2_tol, (where, got["l2"], ref["l2"])
            assert _max_rel(got["inf"], ref["inf"]) <= inf_tol, (where, got["inf"], ref["inf"])
            final, want = _flat(gather_full_state(model, model.layout), names), _flat(ref["params"], names)
            assert (final - want).norm() <= param_tol * want.norm(), where
            assert (final - want).norm() <= update_tol * (want - init).norm(), where


def test_bf16_and_fp16_follow_the_fp32_reference():
    run_distributed(_precision_body, 4)


def _overflow_body(rank, world):
    for zero in (True, False):
        model, opt = build(
            1, (2, 2), zero=zero, dtype=torch.float16, initial_loss_scale=2.0**10, hysteresis=1, loss_scale_window=3
        )
        forward_backward(model, opt, 0)
        assert not opt.step().skipped
        expert = dict(model.named_parameters())["layers.0.mlp.experts.fc1"]
        forward_backward(model, opt, 1)
        if rank == 1:  # one rank's local (not yet reduced) expert gradient overflows
            expert.main_grad.view(-1)[5] = float("inf")
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        shards = opt.state_dict()["shards"]
        result = opt.step()
        assert result.skipped and result.num_skipped_total == 1, result
        assert result.loss_scale == 2.0**9, "the scale halves once (hysteresis 1)"
        for n, p in model.named_parameters():
            assert torch.equal(p, params[n]), f"{n} changed in a skipped step"
        for n, s in opt.state_dict()["shards"].items():
            assert all(torch.equal(s[k], shards[n][k]) for k in ("master", "exp_avg", "exp_avg_sq")), n
        scales = []
        for step in (2, 3, 4):
            forward_backward(model, opt, step)
            result = opt.step()
            assert not result.skipped
            scales.append(result.loss_scale)
        assert scales == [2.0**9, 2.0**9, 2.0**10], f"the scale doubles after 3 clean steps: {scales}"
        assert result.num_skipped_total == 1 and opt.adam_steps == 4


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere_and_halves_the_scale():
    run_distributed(_overflow_body, 4)
