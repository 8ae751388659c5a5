"""Clipping inside torch's fused AdamW (its grad_scale) and as a pass over the main grads (the
other Adam kernels) give the same training, and clipping really is active in the comparison."""

from megamoe.parallel import state as ps
from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.optim.common import HYPER, assert_params_close, build, train


def _body(rank, world):
    runs = []
    for in_adam in (True, False):
        model, opt = build(1, (2, 2), zero=True)
        assert opt._adam_scales_grads, "this CPU build has torch's fused AdamW"
        opt._adam_scales_grads = in_adam
        out = train(model, opt, 3)
        runs.append((out, gather_full_state(model)))
        ps.destroy_model_parallel()
    (fused, fused_params), (explicit, explicit_params) = runs
    assert min(fused["l2"]) > HYPER["clip_grad"], "clipping must be active for this test to mean anything"
    for a, b in zip(fused["l2"], explicit["l2"]):
        assert abs(a - b) <= 1e-6 * b
    assert_params_close(fused_params, explicit_params, "fused vs explicit clipping")


def test_clipping_in_fused_adam_equals_clipping_the_grads():
    run_distributed(_body, 2)
