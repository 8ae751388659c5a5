"""Regression tests for the two MoE bugs of DeepSpeed PR 5259, against the single-process reference:

* expert gradients are summed over EDP and divided by DP -- not by EDP (which makes them EP
  times too large);
* the expert part of the grad norm is summed over each EP size's EP group -- not averaged over
  DP (which divides it by EP) -- and each EP size is its own part.

Adam hides a constant gradient factor, so these compare the reduced gradients and the norm parts
themselves, after the first backward, in layouts where EDP != DP and with two EP sizes.
"""

import math


from megamoe.parallel.gather import gather_full
from megamoe.parallel.params import param_meta
from tests.harness import run_distributed
from tests.tiny_moe import build, forward_backward, reference_run

RTOL = 1e-6  # relative, per tensor and per norm part [measured: 3.4e-7 and 3e-8]
LAYOUTS = [(1, (4, 2), False), (1, (4, 2), True), (2, (2, 2), False), (2, (2, 2), True), (2, (2, 1), True)]


def _part(meta) -> str:
    return "dp" if not meta.is_expert else f"edp(ep={meta.expert_parallel_size})"


def _reduction_body(rank, world):
    ref = reference_run(1, clip_grad=0.0)
    for tp, eps, zero in LAYOUTS:
        where = f"TP={tp} EP={eps} ZeRO={zero}"
        model, opt = build(tp, eps, zero=zero, clip_grad=0.0)
        forward_backward(model, opt, 0)
        opt.finish_grad_sync()
        ref_parts_sq = {}
        for name, p in model.named_parameters():
            meta = param_meta(p)
            want = ref["grads0"][name]
            ref_parts_sq[_part(meta)] = ref_parts_sq.get(_part(meta), 0.0) + want.double().square().sum().item()
            if not zero:  # with ZeRO-1 only this rank's shard of main_grad is reduced
                err = (gather_full(p.main_grad, p, model.layout).double() - want.double()).norm().item()
                assert err <= RTOL * want.double().norm().item(), f"{where} {name}: ||got - want|| = {err:.1e}"
        result = opt.step()
        ref_total = math.sqrt(sum(ref_parts_sq.values()))
        assert math.isclose(ref_total, ref["l2"][0], rel_tol=1e-6)
        assert math.isclose(result.grad_norm, ref_total, rel_tol=RTOL), (where, result.grad_norm, ref_total)
        assert set(opt.last_norm.parts_l2) == set(ref_parts_sq) == {"dp"} | {f"edp(ep={e})" for e in eps}
        for part, sq in ref_parts_sq.items():
            assert math.isclose(opt.last_norm.parts_l2[part], math.sqrt(sq), rel_tol=RTOL), (where, part)
        # The DeepSpeed "fast" formula (expert parts averaged over DP, i.e. divided by EP) misses
        # the reference total by far more than the tolerance above, so that check would catch it.
        averaged = math.sqrt(sum(sq / (int(part[7:-1]) if part != "dp" else 1) for part, sq in ref_parts_sq.items()))
        assert abs(averaged - ref_total) > 10 * RTOL * ref_total, (ref_parts_sq, averaged, ref_total)


def test_expert_grads_divided_by_dp_not_edp_and_expert_norm_summed_over_ep():
    run_distributed(_reduction_body, 4)


def _expert_inf_body(rank, world):
    """One element of one MoE layer's expert gradient (after the reduction, on every copy) is set
    to -10x the model's largest |g|: the inf norm must be its magnitude, in every layout."""
    ref_inf = reference_run(1, clip_grad=0.0)["inf"][0]
    for index, (tp, eps, zero) in enumerate(LAYOUTS):
        where = f"TP={tp} EP={eps} ZeRO={zero}"
        model, opt = build(tp, eps, zero=zero, clip_grad=0.0)
        forward_backward(model, opt, 0)
        opt.finish_grad_sync()
        layer = (0, 2)[index % 2]  # each EP size of the (4, 2) model decides once
        expert = dict(model.named_parameters())[f"layers.{layer}.mlp.experts.fc2"]
        expert.main_grad.view(-1)[7] = -10.0 * ref_inf
        want = abs(expert.main_grad.view(-1)[7].item())
        result = opt.step()
        assert result.grad_norm_inf == want, (where, result.grad_norm_inf, want)


def test_inf_norm_counts_the_experts():
    run_distributed(_expert_inf_body, 4)
