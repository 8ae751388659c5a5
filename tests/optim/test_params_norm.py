"""``MixedPrecisionOptimizer.params_norm()`` (``--log-params-norm``) is the L2 norm of the whole
model, each element once, whatever the layout: TP 2 with two EP sizes, with and without ZeRO-1,
against the full parameters gathered to every rank (fp64)."""

import torch

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
    return out


def test_params_norm_counts_every_element_once_in_any_layout():
    for rank_results in run_distributed(_body, 4):
        for got, want in rank_results:
            assert abs(got - want) <= 1e-6 * want, (got, want)


def _zeros_body(rank, world):
    out = []
    for tp, eps, zero in ((1, (4, 2), False), (2, (2, 1), False), (2, (2, 1), True)):
        model, opt = build(tp, eps, zero=zero)
        train(model, opt, 1)
        out.append(opt.num_zeros_in_grad())
    return out


def test_num_zeros_in_grad_counts_every_element_once_in_any_layout():
    """``--log-num-zeros-in-grad``: the same count in every layout and on every rank, at least
    the padded vocabulary rows (200 ids padded to 256, never looked up: zero gradient)."""
    from tests.tiny_moe import VOCAB

    results = run_distributed(_zeros_body, 4)
    counts = {count for rank_results in results for count in rank_results}
    assert len(counts) == 1, results
    assert counts.pop() >= (256 - VOCAB) * 32
