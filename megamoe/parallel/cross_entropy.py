"""Cross entropy over vocabulary-parallel logits, without gathering the full logits.

``vocab_parallel_cross_entropy(logits [..., V/TP], target [...], vocab_start, vocab_size, layout)``
returns the per-token loss ``[...]`` in fp32, identical on every TP rank.  Each rank holds the
logits of vocabulary ids ``[vocab_start, vocab_start + V/TP)``; ids at or beyond ``vocab_size``
(the padding of the vocabulary) are excluded from the softmax, so the loss does not depend on
how much padding a TP size needs.  Three all-reduces over TP: the max, the target logit and
the sum of exponentials, each of size ``[...]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.mappings import all_reduce_tp
from megamoe.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, layout):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        valid_local = vocab_size - vocab_start
        if valid_local < local_vocab:
            logits = logits.clone()
            logits[..., max(valid_local, 0):] = float("-inf")
        logits_max = logits.max(dim=-1).values
        all_reduce_tp(logits_max, layout, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= local_vocab)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        all_reduce_tp(target_logit, layout)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        all_reduce_tp(sum_exp, layout)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_size: int, layout: ParallelState
) -> torch.Tensor:
    """Per-token loss; the all-reduces run over ``layout``'s TP group."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, layout)
