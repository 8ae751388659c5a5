"""The fused cross-entropy kernels compute what the plain vocab-parallel cross entropy computes:
the per-token loss and the logits' gradient (unchunked), and the loss and the gradients of the
input and the output weight (chunked, ``--cross-entropy-chunk-size``), in fp32 and bf16, with
vocabulary padding and a chunk size that does not divide the tokens, at TP 1 and 2 (where each
rank's softmax statistics are combined over the group); the kernels pass torch's custom-op checks."""

import pytest
import torch

from megamoe.kernels.guard import SUMMED_BF16
from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megamoe.parallel.state import single_rank_layout
from tests.harness import current_layout, run_distributed
from tests.kernels.interpreted import BF16, DEVICE, FP32, fused_here, kernel_module

kernel_module("cross_entropy")
TOKENS, HIDDEN, VOCAB, PADDED, CHUNK = 14, 8, 37, 40, 4  # rank 1 of TP 2 holds 17 ids and 3 padding rows


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(PADDED, HIDDEN, generator=g) * 2).to(DEVICE, dtype)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g).to(DEVICE)
    token_weights = torch.rand(TOKENS, generator=g).to(DEVICE)
    return x, weight, target, token_weights


def _both_paths(run):
    """``run(fused)``'s tensors for the plain path and the fused one."""
    plain = run(False)
    with fused_here():
        fused = run(True)
    return plain, fused


def _compare(layout, dtype):
    rank, tp = layout.tp_rank, layout.tp_size
    shard = PADDED // tp
    x, weight, target, token_weights = _inputs(dtype)
    local_weight = weight[rank * shard : (rank + 1) * shard]
    kw = dict(vocab_start=rank * shard, vocab_size=VOCAB, layout=layout)

    def unchunked(fused):
        logits = (x @ local_weight.t()).requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, target, fused=fused, **kw)
        return loss, *torch.autograd.grad((loss * token_weights).sum(), logits)

    def chunked(fused):
        xg, wg = x.clone().requires_grad_(), local_weight.clone().requires_grad_()
        loss = chunked_linear_cross_entropy(xg, wg, target, token_weights, chunk_size=CHUNK, fused=fused, **kw)
        return loss, *torch.autograd.grad(loss * 3.0, (xg, wg))

    # The chunked path's gradients are GEMMs of the bf16 logits' gradient: its elements' last-bit
    # differences add up over the vocabulary, hence an absolute tolerance of a few bf16 steps.
    tols = (FP32, FP32) if dtype == torch.float32 else (BF16, SUMMED_BF16)
    for run, tol in zip((unchunked, chunked), tols):
        plain, fused = _both_paths(run)
        for p, f in zip(plain, fused):
            assert f.dtype == p.dtype
            torch.testing.assert_close(f, p, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_the_plain_one(dtype):
    _compare(single_rank_layout(), dtype)


def _tp_body(rank, world):
    kernel_module("cross_entropy")
    for dtype in (torch.float32, torch.bfloat16):
        _compare(current_layout(), dtype)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the harness runs gloo on CPU tensors")
def test_fused_cross_entropy_matches_the_plain_one_at_tensor_parallel_2():
    run_distributed(_tp_body, 2, tensor_model_parallel_size=2)


def test_fused_cross_entropy_kernels_pass_the_custom_op_checks():
    logits = torch.randn(3, 10, device=DEVICE)
    target = torch.tensor([1, 9, 4], device=DEVICE)
    torch.library.opcheck(torch.ops.megamoe.cross_entropy_stats, (logits, target, 0, 8))
    torch.library.opcheck(torch.ops.megamoe.cross_entropy_logits_grad,
                          (logits, target, torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE), 0, 8))
