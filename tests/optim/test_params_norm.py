"""``MixedPrecisionOptimizer.params_norm()`` (``--log-params-norm``) is the L2 norm of the whole
model, each element once, whatever the layout: TP 2 with two EP sizes, with and without ZeRO-1,
against the full parameters gathered to every rank (fp64)."""

import torch

from megamoe.parallel import state as ps
from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.tiny_moe import build, train


def _body(rank, world):
    out = []
    for zero in (False, True):
        model, opt = build(2, (2, 1), zero=zero)
        train(model, opt, 1)
        full = gather_full_state(model, model.layout)
        want = torch.cat([t.double().reshape(-1) for t in full.values()]).norm().item()
        out.append((opt.params_norm(), want))
        ps.destroy_model_parallel()
    return out


def test_params_norm_counts_every_element_once_in_any_layout():
    for rank_results in run_distributed(_body, 4):
        for got, want in rank_results:
            assert abs(got - want) <= 1e-6 * want, (got, want)
