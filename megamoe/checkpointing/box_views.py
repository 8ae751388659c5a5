"""A rank's share of the training state as named boxes of global tensors (``boxes``).

Keys (one per global tensor)::

    model/NAME                 every entry of model.state_dict(): parameters and persistent buffers
    optim/KIND/NAME            KIND in master, exp_avg, exp_avg_sq: fp32, the parameter's global shape

A ``BoxView`` pairs a key and a global box with a view of this rank's tensor holding exactly that
box: the source when saving, the destination when loading.  Ranks holding the same box (DP
replicas, TP-replicated parameters, optimizer state without ZeRO-1) produce equal views; the
save writes one of them.  So does a tied input embedding at PP > 1: the first and the last
pipeline stage hold it under one name (one box, written once), and under ZeRO-1 its optimizer
state is sharded over the two stages' DP ranks together (disjoint boxes, each written once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.checkpointing.boxes import Box, flat_range_boxes, global_box
from megamoe.optim.state_dict import OPTIMIZER_KINDS
from megamoe.parallel.sharding import Placement, placement
from megamoe.parallel.state import ParallelState


def model_key(name: str) -> str:
    return f"model/{name}"


def optimizer_key(kind: str, name: str) -> str:
    return f"optim/{kind}/{name}"


@dataclass
class BoxView:
    key: str
    shape: tuple[int, ...]  # of the global tensor
    box: Box  # in the global tensor
    tensor: torch.Tensor  # this rank's view of exactly ``box``


def persistent_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``model.state_dict()`` holds (parameters and persistent buffers), by name,
    as the module's own tensors (with their ``megamoe_meta`` tags)."""
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    return {name: own[name] for name in model.state_dict()}


def placements(model: torch.nn.Module, state: ParallelState) -> dict[str, Placement]:
    """Where each of ``model``'s persistent tensors sits in its global tensor, on ``state``'s rank."""
    return {
        name: placement(tensor.shape, getattr(tensor, "megamoe_meta", None), state)
        for name, tensor in persistent_tensors(model).items()
    }


def model_views(model: torch.nn.Module, where: dict[str, Placement]) -> list[BoxView]:
    out = []
    for name, tensor in persistent_tensors(model).items():
        at = where[name]
        kept = global_box(at, Box((0,) * tensor.dim(), at.local_shape))
        if kept is not None:
            box, index = kept
            out.append(BoxView(model_key(name), at.global_shape, box, tensor.detach()[index]))
    return out


def optimizer_views(shards: dict[str, dict], where: dict[str, Placement]) -> list[BoxView]:
    """Box views of ``megamoe.optim.state_dict``'s ``shards`` (``{name: {start, end, KIND: flat fp32}}``):
    each owned range of a flattened local tensor cut into boxes."""
    out = []
    for name, shard in shards.items():
        at, start = where[name], shard["start"]
        for local, flat_start, flat_end in flat_range_boxes(at.local_shape, start, shard["end"]):
            kept = global_box(at, local)
            if kept is None:
                continue  # vocabulary padding: not part of the global tensor
            box, index = kept
            for kind in OPTIMIZER_KINDS:
                view = shard[kind][flat_start - start : flat_end - start].view(local.sizes)[index]
                out.append(BoxView(optimizer_key(kind, name), at.global_shape, box, view))
    return out
