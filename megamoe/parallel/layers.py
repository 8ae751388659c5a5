"""Tensor-parallel linear and embedding layers.

Weights are created empty and tagged (``megamoe.parallel.params``); values come from
``initialize_module_`` so that they do not depend on the layout.  Each layer is built for the
``layout`` it is given (a ``ParallelState``, with or without process groups): shapes are that
rank's slice, and the forward's collectives use that layout's TP group.  ``output_shape`` lets
a caller fuse several projections into one weight (e.g. ``(3, heads * head_dim)`` for QKV or
``(2, ffn)`` for SwiGLU): the weight is then ``[*output_shape_local, in]`` and the TP split
falls on the sharded output dim, so the full tensor of a fused weight is still a plain stack of
the unfused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.parallel.mappings import gather_from_tp_region, tp_input, tp_output
from megamoe.parallel.params import replicated_bias, tag_param
from megamoe.parallel.state import ParallelState


def _check_divisible(size: int, tp: int, what: str) -> int:
    if size % tp != 0:
        raise ValueError(f"{what} ({size}) is not divisible by --tensor-model-parallel-size {tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split over TP along its output dim.

    input ``[..., in]`` replicated over TP (with sequence parallelism ``[b, s / TP, in]``, this
    rank's part of the sequence, all-gathered first); output ``[..., prod(output_shape) / TP]``
    (this rank's columns), or the full output when ``gather_output``.  ``output_shape[-1]`` is split.
    """

    def __init__(
        self,
        in_features: int,
        output_shape: int | tuple[int, ...],
        *,
        layout: ParallelState,
        bias: bool,
        init_std: float,
        gather_output: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        tp = layout.tp_size
        output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        local_shape = (*output_shape[:-1], _check_divisible(output_shape[-1], tp, "output size"))
        split_dim = len(local_shape) - 1
        self.gather_output = gather_output
        self.weight = tag_param(
            nn.Parameter(torch.empty(*local_shape, in_features, dtype=dtype, device=device)),
            tensor_parallel_dim=split_dim,
            init_std=init_std,
        )
        self.bias = None
        if bias:
            self.bias = tag_param(
                nn.Parameter(torch.empty(*local_shape, dtype=dtype, device=device)),
                tensor_parallel_dim=split_dim,
                weight_decay=False,
                init="zeros",
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(-1, self.weight.shape[-1])
        bias = None if self.bias is None else self.bias.reshape(-1)
        y = F.linear(tp_input(x, self.layout), weight, bias)
        return gather_from_tp_region(y, self.layout) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split over TP along its input dim.

    input ``[..., in / TP]`` (this rank's slice, as produced by a ColumnParallelLinear);
    output ``[..., out]`` summed over the TP group (with sequence parallelism reduce-scattered:
    ``[b, s / TP, out]``); the bias is replicated and added once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        layout: ParallelState,
        bias: bool,
        init_std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        tp = layout.tp_size
        local_in = _check_divisible(in_features, tp, "input size")
        self.weight = tag_param(
            nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device)),
            tensor_parallel_dim=1,
            init_std=init_std,
        )
        self.bias = None
        if bias:
            self.bias = replicated_bias(out_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_output(F.linear(x, self.weight), self.layout)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(nn.Module):
    """``y = x W^T + b`` with W whole on every TP rank; input ``[..., in]``, output ``[..., out]``,
    no collective.

    Its gradient is complete on every TP rank only if ``y``'s is: feed ``y`` to TP layers through
    ``tp_input`` (as a ColumnParallelLinear does), whose backward sums the TP ranks' parts.  With
    sequence parallelism ``x`` is this rank's part of the sequence and the gradient is this
    rank's share, summed over TP by the optimizer's reduction rule like every TP-replicated one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        init_std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.weight = tag_param(
            nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device)), init_std=init_std
        )
        self.bias = None
        if bias:
            self.bias = replicated_bias(out_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Vocabulary padded to a multiple of ``multiple * tp_size`` (Megatron's rule)."""
    step = multiple * tp_size
    return -(-vocab_size // step) * step


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split over TP.

    input ids ``[b, s]`` (any id in ``[0, vocab_size)``); output ``[b, s, hidden]`` replicated over
    TP, or with sequence parallelism this rank's ``[b, s / TP, hidden]`` (reduce-scattered).
    Padding rows are zero and never looked up.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        layout: ParallelState,
        init_std: float,
        pad_multiple: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, layout.tp_size, pad_multiple)
        self.local_vocab = self.padded_vocab_size // layout.tp_size
        self.vocab_start = layout.tp_rank * self.local_vocab
        self.weight = tag_param(
            nn.Parameter(torch.empty(self.local_vocab, hidden_size, dtype=dtype, device=device)),
            tensor_parallel_dim=0,
            unpadded_size=vocab_size,
            weight_decay=True,
            init_std=init_std,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return tp_output(out, self.layout)
