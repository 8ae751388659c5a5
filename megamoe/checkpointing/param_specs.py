"""Where every shard of a checkpoint lives: the parallel layout, and each parameter's full form.

A megamoe checkpoint stores, per rank, the *local* shard of every parameter.  The layout-free
("full") form of a parameter is the one ``megamoe.parallel.gather.gather_full`` produces:

* TP shards concatenated along ``tensor_parallel_dim``, vocabulary padding removed;
* for expert parameters, the local experts of the EP ranks concatenated along dim 0 in global
  order, so the full tensor is ``[num_experts, ...]``.

Which global rank holds a shard (``megamoe.parallel.state``): ``global = dp_rank * TP + tp_rank``;
an expert parameter of EP size ``E`` at EP rank ``e`` lives on every DP rank with
``dp_rank % E == e``.  The copy on the lowest such rank is the canonical one; the others are
replicas that must be bitwise equal to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megamoe.checkpointing.format import SavedTopology, dtype_name
from megamoe.model.config import ModelConfig
from megamoe.parallel.layers import padded_vocab_size
from megamoe.parallel.params import EXPERT_DIM, param_meta


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's full (layout-free) form and how it is sharded.

    ``shape`` is the full shape (experts first for expert parameters, vocabulary padding removed);
    ``tensor_parallel_dim`` indexes the *local* tensor, which for expert parameters has the same
    rank as the full one (the stacked local experts).  ``padded``: the TP dim carries the vocabulary
    padding (``megamoe.parallel.layers.padded_vocab_size``) in the local tensors.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor_parallel_dim: int | None
    is_expert: bool
    padded: bool

    @classmethod
    def from_legacy_entry(cls, name: str, entry: dict, topology: SavedTopology) -> "ParamSpec":
        """From a version 1 ``metadata.json``'s ``params[name]`` (the local shard's shape and tags)
        of a checkpoint saved in ``topology``."""
        shape = list(entry["local_shape"])
        tp_dim = entry["tensor_parallel_dim"]
        ep = entry["expert_parallel_size"]
        if tp_dim is not None:
            shape[tp_dim] = entry["unpadded_size"] if entry["unpadded_size"] is not None else shape[tp_dim] * topology.tp
        if ep is not None:
            shape[EXPERT_DIM] *= ep
        return cls(
            name=name,
            shape=tuple(shape),
            dtype=getattr(torch, entry["dtype"]),
            tensor_parallel_dim=tp_dim,
            is_expert=ep is not None,
            padded=entry["unpadded_size"] is not None,
        )

    @classmethod
    def of(cls, name: str, param: torch.Tensor, shape: tuple[int, ...]) -> "ParamSpec":
        """The spec of a model's parameter whose full shape is ``shape``."""
        meta = param_meta(param)
        return cls(
            name=name,
            shape=tuple(shape),
            dtype=param.dtype,
            tensor_parallel_dim=meta.tensor_parallel_dim,
            is_expert=meta.is_expert,
            padded=meta.unpadded_size is not None,
        )

    def to_entry(self) -> dict:
        """``metadata.json``'s ``params[name]`` (version 2 and consolidated): the full form."""
        return {
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "tensor_parallel_dim": self.tensor_parallel_dim,
            "is_expert": self.is_expert,
            "padded": self.padded,
        }

    @classmethod
    def from_entry(cls, name: str, entry: dict) -> "ParamSpec":
        return cls(
            name=name,
            shape=tuple(entry["shape"]),
            dtype=getattr(torch, entry["dtype"]),
            tensor_parallel_dim=entry["tensor_parallel_dim"],
            is_expert=entry["is_expert"],
            padded=entry["padded"],
        )

    def _padded_size(self, tp: int) -> int:
        return padded_vocab_size(self.shape[self.tensor_parallel_dim], tp)

    def local_shape(self, tp: int, ep_size: int | None) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.is_expert:
            shape[EXPERT_DIM] //= ep_size
        if self.tensor_parallel_dim is not None:
            full = self._padded_size(tp) if self.padded else shape[self.tensor_parallel_dim]
            shape[self.tensor_parallel_dim] = full // tp
        return tuple(shape)

    def shard(self, full: torch.Tensor, *, tp: int, tp_rank: int, ep_size: int | None, ep_rank: int) -> torch.Tensor:
        """This (TP rank, EP rank)'s local tensor cut from the full one (a new, contiguous tensor)."""
        assert tuple(full.shape) == self.shape, (self.name, tuple(full.shape), self.shape)
        part = full
        if self.is_expert:
            local = self.shape[EXPERT_DIM] // ep_size
            part = part.narrow(EXPERT_DIM, ep_rank * local, local)
        dim = self.tensor_parallel_dim
        if dim is not None:
            if self.padded:
                pad = self._padded_size(tp) - self.shape[dim]
                part = torch.cat([part, part.new_zeros(*part.shape[:dim], pad, *part.shape[dim + 1 :])], dim=dim)
            part = part.chunk(tp, dim=dim)[tp_rank]
        return part.clone(memory_format=torch.contiguous_format)

    def unshard(self, shards: list[list[torch.Tensor]], *, where: str) -> torch.Tensor:
        """Full tensor from ``shards[ep_rank][tp_rank]`` (one EP rank for a dense parameter).

        Raises ``ValueError`` (naming ``where``) if the vocabulary padding holds non-zero values:
        dropping them would lose data silently.
        """
        dim = self.tensor_parallel_dim
        per_ep = []
        for row in shards:
            part = torch.cat(row, dim=dim) if dim is not None and len(row) > 1 else row[0]
            if self.padded:
                real = self.shape[dim]
                tail = part.narrow(dim, real, part.shape[dim] - real)
                if tail.numel() and bool((tail != 0).any()):
                    raise ValueError(
                        f"{where}: {self.name} has non-zero values in its vocabulary padding "
                        f"(rows {real}..{part.shape[dim] - 1}); they would be lost by the conversion"
                    )
                part = part.narrow(dim, 0, real)
            per_ep.append(part)
        full = torch.cat(per_ep, dim=EXPERT_DIM) if len(per_ep) > 1 else per_ep[0]
        assert tuple(full.shape) == self.shape, (self.name, tuple(full.shape), self.shape)
        return full


def model_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """``ParamSpec`` of every parameter of ``GPTModel(config)``, in ``named_parameters`` order.

    The names and sharding tags come from the model code itself: the model is built on the meta
    device for rank 0 of a one-rank layout without process groups.
    """
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.state import single_rank_layout

    model = GPTModel(
        dataclasses.replace(config, expert_model_parallel_size=(1,)), single_rank_layout(), device=torch.device("meta")
    )
    specs = {}
    for name, param in model.named_parameters():
        meta = param_meta(param)
        shape = list(param.shape)
        if meta.unpadded_size is not None:
            shape[meta.tensor_parallel_dim] = meta.unpadded_size
        specs[name] = ParamSpec.of(name, param, tuple(shape))
    return specs
