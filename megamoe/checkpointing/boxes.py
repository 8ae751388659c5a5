"""Where a rank's tensors sit in the global (layout-free) tensors, as boxes.

A *box* is a rectangular block of a global tensor: ``offsets`` and ``sizes`` per dim.  A
checkpoint stores every global tensor as boxes (chunks) written by different ranks, and a rank
loads by intersecting the boxes it needs with the chunks on disk; any layout reshards to any
other this way, with no rule per parallel dimension beyond ``placement``.

* A parameter's local tensor is one box of its global tensor (``Placement``); vocabulary padding
  lies outside the global tensor and is clipped off.
* A ZeRO-1 shard of a parameter's optimizer state is a range ``[start, end)`` of the flattened
  local tensor; ``flat_range_boxes`` cuts it into at most ``2 * ndim - 1`` boxes, each a
  contiguous piece of the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megamoe.parallel.params import EXPERT_DIM, ParamMeta
from megamoe.parallel.state import ParallelState


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def intersect(self, other: "Box") -> "Box | None":
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(h <= low for low, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def within(self, outer: "Box") -> tuple[slice, ...]:
        """Index of this box inside a tensor holding box ``outer`` (which contains it)."""
        return tuple(slice(o - p, o - p + s) for o, s, p in zip(self.offsets, self.sizes, outer.offsets))


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[tuple[Box, int, int]]:
    """Elements ``[start, end)`` of a row-major tensor of ``shape`` as ``(box, flat_start, flat_end)``
    in order, each box the contiguous flat range ``[flat_start, flat_end)``."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [(Box((start,) if shape else (), (end - start,) if shape else ()), start, end)]
    inner = math.prod(shape[1:])
    first, first_in = divmod(start, inner)
    last, last_in = divmod(end, inner)

    def rows(row: int, lo: int, hi: int) -> list[tuple[Box, int, int]]:
        base = row * inner
        return [
            (Box((row, *b.offsets), (1, *b.sizes)), base + s, base + e)
            for b, s, e in flat_range_boxes(shape[1:], lo, hi)
        ]

    if first == last:
        return rows(first, first_in, last_in)
    out = []
    if first_in:
        out += rows(first, first_in, inner)
        first += 1
    if last > first:
        out.append((Box((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])), first * inner, last * inner))
    if last_in:
        out += rows(last, 0, last_in)
    return out


@dataclass(frozen=True)
class Placement:
    """A local tensor of ``local_shape`` at ``offsets`` in a global tensor of ``global_shape``."""

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def to_global(self, local: Box) -> tuple[Box, tuple[slice, ...]] | None:
        """Box ``local`` (local coordinates) in global coordinates, clipped to the global tensor,
        with the index of the kept part inside a tensor holding ``local``; None if nothing is kept."""
        shifted = Box(tuple(o + p for o, p in zip(local.offsets, self.offsets)), local.sizes)
        kept = shifted.intersect(Box((0,) * len(self.global_shape), self.global_shape))
        if kept is None:
            return None
        return kept, kept.within(shifted)


def placement(tensor: torch.Tensor, meta: ParamMeta | None, state: ParallelState) -> Placement:
    """Where this rank's ``tensor`` (a parameter tagged with ``meta``, or an untagged buffer,
    which is replicated) sits in its global tensor.  The one place that knows how the parallel
    dimensions cut a tensor: TP along ``tensor_parallel_dim`` (the padded vocabulary clipped to
    ``unpadded_size``) over the TP group for dense parameters and over the expert-TP (ETP) group
    for experts, EP along the expert dim."""
    local = tuple(tensor.shape)
    shape, offsets = list(local), [0] * len(local)
    groups = state.experts(meta.expert_parallel_size) if meta is not None and meta.is_expert else None
    if meta is not None and meta.tensor_parallel_dim is not None:
        dim = meta.tensor_parallel_dim
        rank, size = (groups.etp_rank, groups.etp_size) if groups is not None else (state.tp_rank, state.tp_size)
        offsets[dim] = rank * local[dim]
        shape[dim] = meta.unpadded_size if meta.unpadded_size is not None else local[dim] * size
    if groups is not None:
        offsets[EXPERT_DIM] = groups.ep_rank * local[EXPERT_DIM]
        shape[EXPERT_DIM] = local[EXPERT_DIM] * groups.ep_size
    return Placement(tuple(shape), local, tuple(offsets))
