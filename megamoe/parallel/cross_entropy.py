"""Cross entropy over vocabulary-parallel logits, without gathering the full logits.

``vocab_parallel_cross_entropy(logits [..., V/TP], target [...], vocab_start, vocab_size, layout)``
returns the per-token loss ``[...]`` in fp32, identical on every TP rank.  Each rank holds the
logits of vocabulary ids ``[vocab_start, vocab_start + V/TP)``; ids at or beyond ``vocab_size``
(the padding of the vocabulary) are excluded from the softmax, so the loss does not depend on
how much padding a TP size needs.  Three all-reduces over TP: the max, the target logit and
the sum of exponentials, each of size ``[...]``.

``chunked_linear_cross_entropy(x [T, h], weight [V/TP, h], target [T], token_weights [T], ...)``
is the output layer and the weighted sum of the token losses in one step, ``chunk_size`` tokens
at a time: each chunk's logits exist only while its loss and its gradients (input and weight)
are computed, in forward, so neither the logits nor the softmax of the whole micro-batch is
ever held (``--cross-entropy-chunk-size``).  Both use the same softmax and gradient code: plain
PyTorch ops, or where ``megamoe.kernels.use_fused`` says so (``fused``, on CUDA) two Triton kernels
(``megamoe.kernels.cross_entropy``), one reading the logits for the softmax statistics and one
writing their gradient, with the same all-reduces in between; the fused path keeps the logits for
backward instead of their fp32 softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe import kernels
from megamoe.parallel.mappings import all_reduce_tp
from megamoe.parallel.state import ParallelState


def _valid_columns(local_vocab: int, vocab_start: int, vocab_size: int) -> int:
    """How many of a shard's columns are vocabulary ids (the rest is padding)."""
    return min(max(vocab_size - vocab_start, 0), local_vocab)


def _fused_loss(logits, target, vocab_start, vocab_size, layout):
    """The fused path's per-token loss and log-sum-exp over the whole vocabulary (fp32 ``[...]``):
    the loss of ``_softmax_and_loss`` to fp32 rounding.  Each rank's max and sum of exponentials
    are rescaled to the TP group's max before they are summed."""
    from megamoe.kernels.cross_entropy import row_stats

    local_max, sum_exp, target_logit = row_stats(logits, target, vocab_start,
                                                 _valid_columns(logits.shape[-1], vocab_start, vocab_size))
    logits_max = local_max
    if layout.tp_size > 1:
        logits_max = all_reduce_tp(local_max.clone(), layout, dist.ReduceOp.MAX)
        sum_exp = all_reduce_tp(sum_exp * torch.exp(local_max - logits_max), layout)
        target_logit = all_reduce_tp(target_logit, layout)
    lse = logits_max + sum_exp.log()
    return lse - target_logit, lse


def _fused_logits_grad(logits, target, lse, grad_loss, vocab_start, vocab_size):
    """The fused path's d loss / d logits in the logits' dtype: ``_logits_grad``'s value."""
    from megamoe.kernels.cross_entropy import logits_grad

    return logits_grad(logits, target, lse, grad_loss.float(), vocab_start,
                       _valid_columns(logits.shape[-1], vocab_start, vocab_size))


def _softmax_and_loss(logits, target, vocab_start, vocab_size, layout):
    """From local logits ``[..., V/TP]`` (any float dtype; not modified): the fp32 softmax over the
    whole vocabulary, the per-token loss, and where each target sits locally (``outside``: on
    another TP rank).  The fp32 logits are never copied: ``logits - max`` promotes as it subtracts
    (the same numbers as subtracting from an fp32 copy)."""
    local_vocab = logits.shape[-1]
    valid_local = _valid_columns(local_vocab, vocab_start, vocab_size)
    if valid_local > 0:
        logits_max = logits[..., :valid_local].max(dim=-1).values.float()
    else:
        logits_max = logits.new_full(logits.shape[:-1], float("-inf"), dtype=torch.float32)
    all_reduce_tp(logits_max, layout, dist.ReduceOp.MAX)
    shifted = torch.sub(logits, logits_max.unsqueeze(-1), out=torch.empty(logits.shape, dtype=torch.float32,
                                                                               device=logits.device))
    if valid_local < local_vocab:  # the vocabulary's padding is no class
        shifted[..., valid_local:] = float("-inf")

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
    return softmax, loss, local_target, outside


def _logits_grad(softmax, local_target, outside, grad_loss, dtype):
    """d loss / d logits in ``dtype``: ``(softmax - onehot(target)) * grad_loss``, computed in fp32
    (``softmax`` is overwritten) and rounded once as it is written."""
    onehot = (~outside).to(softmax.dtype).unsqueeze(-1)
    softmax.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
    return torch.mul(softmax, grad_loss.unsqueeze(-1), out=torch.empty(softmax.shape, dtype=dtype,
                                                                        device=softmax.device))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, layout, fused):
        ctx.fused, ctx.vocab_start, ctx.vocab_size = fused, vocab_start, vocab_size
        if fused:
            loss, lse = _fused_loss(logits, target, vocab_start, vocab_size, layout)
            ctx.save_for_backward(logits, target, lse)
            return loss
        softmax, loss, local_target, outside = _softmax_and_loss(logits, target, vocab_start, vocab_size, layout)
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.fused:
            logits, target, lse = ctx.saved_tensors
            grad = _fused_logits_grad(logits, target, lse, grad_loss, ctx.vocab_start, ctx.vocab_size)
        else:
            softmax, local_target, outside = ctx.saved_tensors
            grad = _logits_grad(softmax, local_target, outside, grad_loss, ctx.logits_dtype)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_size: int, layout: ParallelState,
    fused: bool = True,
) -> torch.Tensor:
    """Per-token loss; the all-reduces run over ``layout``'s TP group.  ``fused``: the Triton
    kernels where ``kernels.use_fused`` allows them."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, layout,
                                            kernels.use_fused("cross_entropy", fused, logits))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, token_weights, vocab_start, vocab_size, layout, chunk_size, needs_grad, fused):
        token_weights = token_weights.float()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # The gradients are computed for weights scaled to a largest value of 1 and scaled back in
        # backward: the loss scale is not known here, and fp16 would flush gradients of a
        # 1/tokens weight to zero.
        weight_max = token_weights.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
        unit_weights = token_weights / weight_max
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, x.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            x_c = x[rows]
            # The logits in the weight's dtype, as F.linear computes them for the plain cross entropy.
            logits = torch.matmul(x_c, weight.t())
            if fused:
                loss, lse = _fused_loss(logits, target[rows], vocab_start, vocab_size, layout)
            else:
                softmax, loss, local_target, outside = _softmax_and_loss(
                    logits, target[rows], vocab_start, vocab_size, layout)
            total += (loss * token_weights[rows]).sum()
            if needs_grad:
                if fused:
                    grad_logits = _fused_logits_grad(logits, target[rows], lse, unit_weights[rows], vocab_start,
                                                     vocab_size)
                else:
                    grad_logits = _logits_grad(softmax, local_target, outside, unit_weights[rows], weight.dtype)
                grad_x[rows] = torch.matmul(grad_logits, weight)
                # the chunk's product in the weight's dtype, added in fp32 (the add promotes: no fp32 copy)
                grad_weight.add_(torch.matmul(grad_logits.t(), x_c))
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_weight, weight_max)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_weight, weight_max = ctx.saved_tensors
        factor = grad_total.float() * weight_max  # a 0-dim fp32 tensor: grad_x keeps its dtype
        return (grad_x * factor, (grad_weight * factor).to(ctx.weight_dtype),
                None, None, None, None, None, None, None, None)


def chunked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    layout: ParallelState,
    chunk_size: int,
    fused: bool = True,
) -> torch.Tensor:
    """``sum_t token_weights[t] * loss_t`` (fp32 scalar, identical on every TP rank) of the logits
    ``x @ weight.T``: x ``[T, h]`` (this rank's TP input), weight ``[V/TP, h]`` (this rank's
    vocabulary shard), target and token_weights ``[T]``.  The all-reduces run over ``layout``'s TP
    group, three per chunk of ``chunk_size`` tokens.  Memory beyond the inputs: one chunk's logits
    in forward, and the gradients of x and of weight (fp32), kept for backward; without grad
    mode (evaluation) only the loss is computed.  ``fused``: the Triton kernels where
    ``kernels.use_fused`` allows them."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(
        x, weight, target, token_weights, vocab_start, vocab_size, layout, chunk_size, needs_grad,
        kernels.use_fused("cross_entropy", fused, x))
