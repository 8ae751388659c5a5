"""The vocab-parallel cross entropy never copies the logits to fp32 and writes their gradient in
their dtype at once, and computes the bits of the plain formulation (an fp32 copy of the logits,
max, subtract, exp, sum, divide; the gradient in fp32, then cast), with vocabulary padding."""

import pytest
import torch

from megamoe.parallel.cross_entropy import vocab_parallel_cross_entropy
from megamoe.parallel.state import single_rank_layout

TOKENS, VOCAB, PADDED = 33, 300, 384


def _plain(logits, target):
    """The formulation the fewer-pass one replaces, at TP 1: loss [T] and d(sum of weighted loss)/d logits."""
    x = logits.detach().to(torch.float32, copy=True)
    x[..., VOCAB:] = float("-inf")
    shifted = x.sub_(x.max(dim=-1).values.unsqueeze(-1))
    target_logit = shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    loss = sum_exp.log() - target_logit
    softmax = exp.div_(sum_exp.unsqueeze(-1))
    return loss, softmax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_gives_the_bits_of_the_fp32_copy_formulation(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(TOKENS, PADDED, generator=g) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    weights = torch.rand(TOKENS, generator=g)
    loss = vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=VOCAB, layout=single_rank_layout())
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    want_loss, softmax = _plain(logits, target)
    softmax.scatter_add_(-1, target.unsqueeze(-1), -torch.ones(TOKENS, 1))
    want_grad = softmax.mul_(weights.unsqueeze(-1)).to(dtype)
    assert torch.equal(loss, want_loss)
    assert grad.dtype == dtype and torch.equal(grad, want_grad)
