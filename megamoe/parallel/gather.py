"""Gather a sharded parameter (or its gradient) back to its full, layout-free tensor.

Full form: TP (experts: ETP) shards concatenated along ``tensor_parallel_dim``, vocabulary padding removed,
and for expert parameters the local experts of every EP rank concatenated in global order
(``[num_experts, ...]``).  Used by the parity tests and by checkpoint consolidation; every rank
of the groups involved must call it (it runs collectives).
"""

from __future__ import annotations

import torch

from megamoe.parallel.mappings import all_gather_cat
from megamoe.parallel.params import EXPERT_DIM, param_meta
from megamoe.parallel.state import ParallelState


def gather_full(tensor: torch.Tensor, param: torch.Tensor, layout: ParallelState) -> torch.Tensor:
    """``tensor`` has ``param``'s local shape in ``layout`` (the param itself or its gradient);
    returns the full tensor, gathered over ``layout``'s groups."""
    meta = param_meta(param)
    full = tensor.detach()
    if meta.is_expert:
        groups = layout.experts(meta.expert_parallel_size)
        if meta.tensor_parallel_dim is not None:
            full = all_gather_cat(full, meta.tensor_parallel_dim, groups.etp_group, groups.etp_size)
        full = all_gather_cat(full, EXPERT_DIM, groups.ep_group, groups.ep_size)
    elif meta.tensor_parallel_dim is not None:
        full = all_gather_cat(full, meta.tensor_parallel_dim, layout.tp_group, layout.tp_size)
        if meta.unpadded_size is not None:
            full = full.narrow(meta.tensor_parallel_dim, 0, meta.unpadded_size)
    return full


def gather_full_state(module: torch.nn.Module, layout: ParallelState, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter (or of its ``.grad`` when ``grads``), keyed by name."""
    out = {}
    for name, param in module.named_parameters():
        source = param.grad if grads else param
        if source is None:
            source = torch.zeros_like(param)
        out[name] = gather_full(source, param, layout)
    return out
