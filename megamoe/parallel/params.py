"""Parameter metadata and layout-independent initialisation.

Every parameter megamoe creates carries one ``ParamMeta`` at ``param.megamoe_meta`` (set by
``tag_param``, read by ``param_meta``).  It is the only thing the optimizer, the grad norm and
the checkpoint code look at to decide how a parameter is sharded and which group reduces it:

* ``tensor_parallel_dim``: the dim split over the TP group (``None``: replicated over TP); for an
  expert parameter, over its ETP group (``--expert-tensor-parallel-size``).
* ``expert_parallel_size``: EP size of the MoE layer owning it (``None``: a dense parameter).
  Expert weights are stacked ``[local_experts, ...]`` along ``EXPERT_DIM`` (always 0); rank
  ``ep_rank`` holds global experts ``ep_rank * local_experts ...``.
* ``unpadded_size``: along ``tensor_parallel_dim``, entries at or beyond it are padding (the
  padded vocabulary) and are zero-initialised.
* ``weight_decay``: whether AdamW decays it (matrices yes, norms and biases no).
* ``init`` / ``init_std``: how the *full* tensor is drawn.

Initialisation draws the full (global, unsharded) tensor from a generator seeded by
``(seed, parameter name[, global expert index])`` and keeps this rank's slice, so a model built
at any TP/EP layout holds the same numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch

from megamoe.parallel.state import ParallelState

EXPERT_DIM = 0


@dataclass(frozen=True)
class ParamMeta:
    tensor_parallel_dim: int | None = None
    expert_parallel_size: int | None = None
    unpadded_size: int | None = None
    weight_decay: bool = True
    init: str = "normal"  # normal | zeros | ones
    init_std: float = 0.02

    @property
    def is_expert(self) -> bool:
        return self.expert_parallel_size is not None

    def __post_init__(self) -> None:
        assert self.init in ("normal", "zeros", "ones"), self.init


def tag_param(param: torch.nn.Parameter, **fields) -> torch.nn.Parameter:
    param.megamoe_meta = ParamMeta(**fields)
    return param


def param_meta(param: torch.Tensor) -> ParamMeta:
    meta = getattr(param, "megamoe_meta", None)
    assert meta is not None, "parameter was created without tag_param"
    return meta


def retag(param: torch.nn.Parameter, **changes) -> None:
    param.megamoe_meta = replace(param_meta(param), **changes)


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def full_shape(param: torch.Tensor, layout: ParallelState) -> list[int]:
    """Global shape of one expert's (or a dense) tensor: local shape (in ``layout``) with the TP
    (experts: ETP) dim gathered and the expert dim dropped."""
    meta = param_meta(param)
    shape = list(param.shape)
    if meta.tensor_parallel_dim is not None:
        shape[meta.tensor_parallel_dim] *= layout.etp_size if meta.is_expert else layout.tp_size
    if meta.is_expert:
        shape = shape[1:]
    return shape


def _draw_full(meta: ParamMeta, shape: list[int], seed: int, device, dtype) -> torch.Tensor:
    if meta.init == "zeros":
        return torch.zeros(shape, device=device, dtype=dtype)
    if meta.init == "ones":
        return torch.ones(shape, device=device, dtype=dtype)
    # Drawn on the CPU whatever the device: CPU and CUDA generators give different numbers, and
    # a model must hold the same weights on every device, not only in every layout.
    generator = torch.Generator()
    generator.manual_seed(seed)
    draw_shape = list(shape)
    tp_dim = meta.tensor_parallel_dim
    if meta.unpadded_size is not None:
        draw_shape[tp_dim - (1 if meta.is_expert else 0)] = meta.unpadded_size
    full = torch.empty(draw_shape, dtype=torch.float32)
    full.normal_(0.0, meta.init_std, generator=generator)
    if draw_shape != shape:
        padded = torch.zeros(shape, dtype=torch.float32)
        padded[tuple(slice(0, n) for n in draw_shape)] = full
        full = padded
    return full.to(device=device, dtype=dtype)


@torch.no_grad()
def initialize_param_(param: torch.Tensor, name: str, seed: int, layout: ParallelState) -> None:
    """Fill ``param`` with ``layout``'s rank's slice of the full tensor drawn for ``name`` and
    ``seed``.  Runs no collective."""
    meta = param_meta(param)
    shape = full_shape(param, layout)
    tp_dim = meta.tensor_parallel_dim
    if meta.is_expert:
        local_experts = param.shape[EXPERT_DIM]
        groups = layout.experts(meta.expert_parallel_size)
        first = groups.ep_rank * local_experts
        for local in range(local_experts):
            full = _draw_full(meta, shape, _seed_for(seed, f"{name}#expert{first + local}"), param.device, param.dtype)
            if tp_dim is not None:
                full = full.chunk(groups.etp_size, dim=tp_dim - 1)[groups.etp_rank]
            param[local].copy_(full)
        return
    full = _draw_full(meta, shape, _seed_for(seed, name), param.device, param.dtype)
    if tp_dim is not None:
        full = full.chunk(layout.tp_size, dim=tp_dim)[layout.tp_rank]
    param.copy_(full)


def initialize_module_(module: torch.nn.Module, seed: int, layout: ParallelState) -> None:
    """Layout-independent initialisation of every parameter of ``module``, built for ``layout``."""
    for name, param in module.named_parameters():
        initialize_param_(param, name, seed, layout)
