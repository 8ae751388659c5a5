"""Clipping inside torch's fused AdamW (its grad_scale) and as a pass over the main grads give the
same training, clipping really is active in the comparison, and the inside path is chosen only
where a probe shows fused AdamW applies grad_scale."""

import torch

from megamoe.optim.adam import FusedSupport, fused_adamw_support
from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.tiny_moe import HYPER, assert_params_close, build, full_params, train


class _IgnoresGradScale(torch.optim.AdamW):
    """A fused AdamW that drops ``grad_scale`` (as a future torch could)."""

    def step(self, closure=None):
        self.grad_scale = None
        return super().step(closure)


def test_probe_finds_grad_scale_in_fused_adamw_on_cpu():
    assert fused_adamw_support(torch.device("cpu")) == FusedSupport(runs=True, applies_grad_scale=True)


def test_probe_refuses_a_fused_adamw_that_ignores_grad_scale_and_a_device_without_fused_kernels():
    assert fused_adamw_support(torch.device("cpu"), _IgnoresGradScale) == FusedSupport(True, False)
    assert fused_adamw_support(torch.device("meta")) == FusedSupport(False, False)


def _body(rank, world):
    runs = []
    for in_adam in (True, False):
        model, opt = build(1, (2, 2), zero=True)
        assert opt.clip_in_adam, "on CPU torch's fused AdamW applies grad_scale (probe)"
        opt.clip_in_adam = in_adam
        out = train(model, opt, 3)
        runs.append((out, gather_full_state(model, model.layout)))
    (fused, fused_params), (explicit, explicit_params) = runs
    assert min(fused["l2"]) > HYPER["clip_grad"], "clipping must be active for this test to mean anything"
    for a, b in zip(fused["l2"], explicit["l2"]):
        assert abs(a - b) <= 1e-6 * b
    assert_params_close(fused_params, explicit_params, "fused vs explicit clipping")


def test_clipping_in_fused_adam_equals_clipping_the_grads():
    run_distributed(_body, 2)


def _inactive_body(rank, world):
    for in_adam in (True, False):
        runs = []
        for clip_grad in (1e3, 0.0):  # far above every norm of this run, and off
            model, opt = build(1, (2, 2), zero=True, clip_grad=clip_grad)
            opt.clip_in_adam = in_adam
            out = train(model, opt, 3)
            runs.append((out["l2"], full_params(model)))
        (above, above_params), (off, off_params) = runs
        assert max(above) < 1e3 and above == off, (above, off)
        for name, want in off_params.items():
            assert torch.equal(above_params[name], want), f"clip_in_adam={in_adam}: {name} changed by an inactive clip"


def test_a_clip_above_the_norm_changes_nothing():
    """Clipping only ever scales down: a norm below --clip-grad leaves the step bitwise that of no
    clipping (scaling up would change Adam's steps through its epsilon)."""
    run_distributed(_inactive_body, 2)
