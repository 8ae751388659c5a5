"""Where a rank's tensors sit in the global (layout-free) tensors, as boxes.

A *box* is a rectangular block of a global tensor: ``offsets`` and ``sizes`` per dim.  A
checkpoint stores every global tensor as boxes (chunks) written by different ranks, and a rank
loads by intersecting the boxes it needs with the chunks on disk; any layout reshards to any
other this way, with no rule per parallel dimension beyond ``megamoe.parallel.sharding``.

* A parameter's local tensor is one box of its global tensor (``sharding.placement``);
  vocabulary padding lies outside the global tensor and is clipped off (``global_box``).
* A ZeRO-1 shard of a parameter's optimizer state is a range ``[start, end)`` of the flattened
  local tensor; ``flat_range_boxes`` cuts it into at most ``2 * ndim - 1`` boxes, each a
  contiguous piece of the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamoe.parallel.sharding import Placement


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


def global_box(at: Placement, local: Box) -> tuple[Box, tuple[slice, ...]] | None:
    """Box ``local`` of a local tensor placed at ``at`` (``megamoe.parallel.sharding``), in global
    coordinates and clipped to the global tensor (vocabulary padding lies outside it), with the
    index of the kept part inside a tensor holding ``local``; None if nothing is kept."""
    shifted = Box(tuple(o + p for o, p in zip(local.offsets, at.offsets)), local.sizes)
    kept = shifted.intersect(Box((0,) * len(at.global_shape), at.global_shape))
    if kept is None:
        return None
    return kept, kept.within(shifted)
