"""Gather a sharded parameter (or its gradient) back to its full, layout-free tensor.

Full form (``sharding``): the TP (experts: ETP) parts joined along ``tensor_parallel_dim``,
vocabulary padding removed, and for expert parameters the local experts of every EP rank joined
in global order (``[num_experts, ...]``).  Used by the parity tests; every rank of the groups
involved must call it (it runs collectives).
"""

from __future__ import annotations

import torch

from megamoe.parallel.mappings import all_gather_cat
from megamoe.parallel.params import param_meta
from megamoe.parallel.sharding import placement, splits
from megamoe.parallel.state import ParallelState


def gather_full(tensor: torch.Tensor, param: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """``tensor`` has ``param``'s local shape in ``layout`` (the param itself or its gradient);
    returns the full tensor, gathered over the groups ``param`` is cut over."""
    meta = param_meta(param)
    full = tensor.detach()
    for split in splits(meta, layout):
        full = all_gather_cat(full, split.dim, split.group, split.size)
    return full[tuple(slice(0, n) for n in placement(tensor.shape, meta, layout).global_shape)]


def gather_full_state(module: torch.nn.Module, layout: ParallelState, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter (or of its ``.grad`` when ``grads``), keyed by name."""
    out = {}
    for name, param in module.named_parameters():
        source = param.grad if grads else param
        if source is None:
            source = torch.zeros_like(param)
        out[name] = gather_full(source, param, layout)
    return out
