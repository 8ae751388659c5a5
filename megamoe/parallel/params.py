"""Parameter metadata and layout-independent initialisation.

Every parameter megamoe creates carries one ``ParamMeta`` at ``param.megamoe_meta`` (set by
``tag_param``, read by ``param_meta``).  It is the only thing the optimizer, the grad norm and
the checkpoint code look at to decide how a parameter is sharded (the rule: ``sharding``) and
which group reduces it:

* ``tensor_parallel_dim``: the dim split over the TP group (``None``: replicated over TP); for an
  expert parameter, over its ETP group (``--expert-tensor-parallel-size``).
* ``expert_parallel_size``: EP size of the MoE layer owning it (``None``: a dense parameter).
  Expert weights are stacked ``[local_experts, ...]`` along ``sharding.EXPERT_DIM``.
* ``unpadded_size``: along ``tensor_parallel_dim``, entries at or beyond it are padding (the
  padded vocabulary) and are zero-initialised.
* ``weight_decay``: whether AdamW decays it (matrices yes, norms and biases no).
* ``init`` / ``init_std``: how the *full* tensor is drawn.
* ``pipeline_tied``: the input embedding at PP > 1 when the last stage uses it too (tied output
  weights, or the MTP depths), held by the first
  and the last stage (a replica there), its gradient reduced over both (``grad_buffer``).

Initialisation draws the full (global, unsharded) tensor from a generator seeded by
``(seed, parameter name[, global expert index])`` and keeps this rank's block, so a model built
at any TP/EP/ETP layout holds the same numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch

from megamoe.parallel.sharding import EXPERT_DIM, placement
from megamoe.parallel.state import ParallelState


@dataclass(frozen=True)
class ParamMeta:
    tensor_parallel_dim: int | None = None
    expert_parallel_size: int | None = None
    unpadded_size: int | None = None
    weight_decay: bool = True
    init: str = "normal"  # normal | zeros | ones
    init_std: float = 0.02
    pipeline_tied: bool = False

    @property
    def is_expert(self) -> bool:
        return self.expert_parallel_size is not None

    def __post_init__(self) -> None:
        assert self.init in ("normal", "zeros", "ones"), self.init


def tag_param(param: torch.nn.Parameter, **fields) -> torch.nn.Parameter:
    param.megamoe_meta = ParamMeta(**fields)
    return param


def replicated_bias(size: int, *, dtype: torch.dtype, device: torch.device | None) -> torch.nn.Parameter:
    """A ``[size]`` bias whole on every rank (dense, TP-replicated), zero-initialised, not decayed."""
    return tag_param(torch.nn.Parameter(torch.empty(size, dtype=dtype, device=device)), weight_decay=False,
                     init="zeros")


def param_meta(param: torch.Tensor) -> ParamMeta:
    meta = getattr(param, "megamoe_meta", None)
    assert meta is not None, "parameter was created without tag_param"
    return meta


def retag(param: torch.nn.Parameter, **changes) -> None:
    param.megamoe_meta = replace(param_meta(param), **changes)


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _draw_full(
    meta: ParamMeta, shape: tuple[int, ...], padded_shape: tuple[int, ...], seed: int, device, dtype
) -> torch.Tensor:
    """The full tensor of ``shape`` drawn from ``seed``, zero-padded to ``padded_shape``."""
    if meta.init == "zeros":
        return torch.zeros(padded_shape, device=device, dtype=dtype)
    if meta.init == "ones":
        return torch.ones(padded_shape, device=device, dtype=dtype)
    # Drawn on the CPU whatever the device: CPU and CUDA generators give different numbers, and
    # a model must hold the same weights on every device, not only in every layout.
    generator = torch.Generator()
    generator.manual_seed(seed)
    full = torch.empty(shape, dtype=torch.float32)
    full.normal_(0.0, meta.init_std, generator=generator)
    if shape != padded_shape:
        padded = torch.zeros(padded_shape, dtype=torch.float32)
        padded[tuple(slice(0, n) for n in shape)] = full
        full = padded
    return full.to(device=device, dtype=dtype)


@torch.no_grad()
def initialize_param_(param: torch.Tensor, name: str, seed: int, layout: ParallelState) -> None:
    """Fill ``param`` with ``layout``'s rank's block (``sharding.placement``) of the full tensor
    drawn for ``name`` and ``seed``; each expert is drawn on its own, seeded by its global index.
    Runs no collective."""
    meta = param_meta(param)
    at = placement(param.shape, meta, layout)
    if meta.is_expert:
        first = at.offsets[EXPERT_DIM]
        for local in range(param.shape[EXPERT_DIM]):
            seed_e = _seed_for(seed, f"{name}#expert{first + local}")
            full = _draw_full(meta, at.global_shape[1:], at.padded_shape[1:], seed_e, param.device, param.dtype)
            param[local].copy_(full[at.index[1:]])
        return
    full = _draw_full(meta, at.global_shape, at.padded_shape, _seed_for(seed, name), param.device, param.dtype)
    param.copy_(full[at.index])


def initialize_module_(module: torch.nn.Module, seed: int, layout: ParallelState) -> None:
    """Layout-independent initialisation of every parameter of ``module``, built for ``layout``."""
    for name, param in module.named_parameters():
        initialize_param_(param, name, seed, layout)
