"""--overlap-grad-reduce: launching bucket reductions during backward changes no number, really
happens during backward, and refuses a second backward that would add to launched buckets."""

import contextlib

import pytest
import torch

from megamoe.parallel.gather import gather_full_state
from tests.harness import run_distributed
from tests.tiny_moe import build, local_micro_batches

BUCKET = 3000  # small buckets: many collectives in flight, dense and expert interleaved
LAYOUTS = [(1, (2, 2), True), (2, (2, 1), False), (1, (4, 2), False)]


def _train(model, opt, steps, *, overlap):
    norms, launched = [], []
    for step in range(steps):
        batches = local_micro_batches(step, model.layout)
        opt.zero_grad()
        for i, (tokens, labels) in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else opt.no_sync():
                (model(tokens, labels).loss / len(batches)).backward()
            if overlap:
                launched.append((last, opt.grad_sync.launched, len(opt.grad_sync.order)))
        result = opt.step()
        norms.append((result.grad_norm, result.grad_norm_inf))
    return norms, gather_full_state(model, model.layout), launched


def _overlap_body(rank, world):
    for tp, eps, zero in LAYOUTS:
        runs = {}
        for overlap in (False, True):
            model, opt = build(tp, eps, zero=zero, bucket_size=BUCKET, overlap_grad_reduce=overlap)
            runs[overlap] = _train(model, opt, 3, overlap=overlap)
        (norms, params, _), (norms_o, params_o, launched) = runs[False], runs[True]
        assert norms == norms_o, (tp, eps, zero, norms, norms_o)
        for name in params:
            assert torch.equal(params[name], params_o[name]), (tp, eps, zero, name)
        total = launched[0][2]
        assert total > 4, "the test needs several buckets"
        for last, count, _ in launched:
            # nothing launches before the last micro-batch; by the end of its backward, every bucket has
            assert count == (total if last else 0), (tp, eps, zero, last, count, total)


def test_overlapped_reduction_is_bitwise_identical_and_runs_during_backward():
    run_distributed(_overlap_body, 4, timeout=400)


def _misuse_body(rank, world):
    model, opt = build(1, (1, 1), zero=False, bucket_size=BUCKET, overlap_grad_reduce=True)
    tokens, labels = local_micro_batches(0, model.layout)[0]
    opt.zero_grad()
    model(tokens, labels).loss.backward()
    with pytest.raises(RuntimeError, match=r"inside optimizer.no_sync\(\)"):
        model(tokens, labels).loss.backward()


def test_second_backward_without_no_sync_is_refused():
    run_distributed(_misuse_body, 1)
