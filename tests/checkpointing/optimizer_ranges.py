"""Test helpers: which elements of which parameter each rank's optimizer owns, in a layout no
process runs, and each parameter's EP size in a model config.

The optimizer (``megamoe.optim``) keeps, per rank, the fp32 master and Adam moments of the
ranges of each parameter's flattened local tensor that fall in this rank's ZeRO-1 shards of the
gradient buffers (the whole tensor without ZeRO-1).  Those ranges depend on the buffer packing
(parameter order, alignment, bucket size, group sizes), so rather than re-deriving it we build
the very ``GradBuffer`` objects the optimizer builds, over parameters on the ``meta`` device and
a ``ParallelState`` without process groups (``build_grad_buffers`` runs no collective).
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.checkpointing.convert.full_state import layer_of
from megamoe.checkpointing.format import SavedTopology
from megamoe.checkpointing.param_specs import ParamSpec
from megamoe.model.config import ModelConfig
from megamoe.optim.grad_buffer import build_grad_buffers
from megamoe.parallel.params import tag_param


class _MetaParams:
    """Stands in for the model: ``build_grad_buffers`` only calls ``named_parameters``."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._named = named

    def named_parameters(self):
        return iter(self._named)


def target_ep_sizes(specs: dict[str, ParamSpec], config: ModelConfig) -> dict[str, int | None]:
    """EP size of every parameter in a model laid out by ``config`` (None for dense ones)."""
    return {name: config.ep_size_for_layer(layer_of(name)) if spec.is_expert else None for name, spec in specs.items()}


def owned_ranges(
    specs: dict[str, ParamSpec], ep_of: dict[str, int | None], layout: SavedTopology, *, rank: int, bucket_size: int
) -> dict[str, tuple[int, int]]:
    """``{name: (start, end)}``: the range of each parameter's flattened local tensor whose
    optimizer state rank ``rank`` of ``layout`` owns (parameters it owns none of are absent)."""
    named = []
    for name, spec in specs.items():
        ep = ep_of[name]
        param = nn.Parameter(torch.empty(spec.local_shape(layout.tp, ep), dtype=spec.dtype, device="meta"))
        tag_param(
            param,
            tensor_parallel_dim=spec.tensor_parallel_dim,
            expert_parallel_size=ep,
            unpadded_size=spec.shape[spec.tensor_parallel_dim] if spec.padded else None,
        )
        named.append((name, param))
    buffers = build_grad_buffers(
        _MetaParams(named),
        layout.state(rank),
        bucket_size=bucket_size,
        sharded=layout.use_distributed_optimizer,
    )
    return {piece.name: (piece.param_start, piece.param_end) for buf in buffers for piece in buf.pieces()}
