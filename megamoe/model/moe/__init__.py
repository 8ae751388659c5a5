"""Mixture-of-Experts block: top-k router, capacity/dropping, all-to-all dispatch over the
expert-parallel group, stacked grouped experts (see ``layer.MoELayer`` for the data flow)."""

from megamoe.model.moe.layer import MoEAux, MoELayer, MoEStats

__all__ = ["MoEAux", "MoELayer", "MoEStats"]
