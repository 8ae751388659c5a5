"""Each parameter's full (layout-free) form, as a checkpoint records it (``metadata.json``'s
``params``; ``model_specs`` lists a model's).

A checkpoint stores every parameter as its *global* tensor, in boxes (``boxes``), whatever layout
wrote it.  The global form is the one ``megamoe.parallel.sharding`` defines (and
``megamoe.parallel.gather.gather_full`` produces): the TP parts (experts: ETP parts) joined
along ``tensor_parallel_dim``, vocabulary padding removed; for expert parameters the local
experts of the EP ranks joined along dim 0 in global order, so the tensor is ``[num_experts, ...]``.

Which ranks hold a block (``megamoe.parallel.rank_lists``): dense and expert parameters are laid
out independently ("MoE parallel folding").  TP part ``t`` of a dense parameter is on every rank
with TP rank ``t`` (``global = dp_rank * TP + tp_rank``: the DP group holds copies).  The block
at EP rank ``e`` and ETP rank ``f`` of an expert parameter whose layer has EP size ``EP`` is on
the ranks ``global = (edp_rank * EP + e) * ETP + f``, one per EDP rank (the EDP group holds
copies).  The save writes every block once, from one of its holders (``save``); a rank of any
layout loads the boxes it holds (``load``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.checkpointing.format import SavedTopology, dtype_name
from megamoe.model.config import ModelConfig
from megamoe.parallel.params import ParamMeta, param_meta
from megamoe.parallel.sharding import placement


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's full (layout-free) form and its sharding tags.

    ``shape`` is the full shape (experts first for expert parameters, vocabulary padding removed);
    ``tensor_parallel_dim`` indexes the *local* tensor, which for expert parameters has the same
    rank as the full one (the stacked local experts).  ``padded``: the TP dim carries the vocabulary
    padding in the local tensors.  How a layout cuts it: ``meta`` and ``megamoe.parallel.sharding``.
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
        meta = ParamMeta(
            tensor_parallel_dim=entry["tensor_parallel_dim"],
            expert_parallel_size=entry["expert_parallel_size"],
            unpadded_size=entry["unpadded_size"],
        )
        return cls(
            name=name,
            shape=placement(entry["local_shape"], meta, topology.state(0)).global_shape,
            dtype=getattr(torch, entry["dtype"]),
            tensor_parallel_dim=meta.tensor_parallel_dim,
            is_expert=meta.is_expert,
            padded=meta.unpadded_size is not None,
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

    def meta(self, expert_parallel_size: int | None) -> ParamMeta:
        """The sharding tags (``megamoe.parallel.sharding``) of this parameter in a layout that
        gives its layer EP size ``expert_parallel_size`` (ignored for a dense parameter)."""
        return ParamMeta(
            tensor_parallel_dim=self.tensor_parallel_dim,
            expert_parallel_size=expert_parallel_size if self.is_expert else None,
            unpadded_size=self.shape[self.tensor_parallel_dim] if self.padded else None,
        )


def _whole_model(config: ModelConfig, params_dtype: torch.dtype | None = None):
    """``GPTModel(config)`` on the meta device for rank 0 of a one-rank layout without process
    groups: every tensor of the model under the name and tags any layout gives it (a pipeline
    stage holds some of them, under the same names)."""
    from megamoe.model.execution import ExecutionConfig
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.state import single_rank_layout

    execution = ExecutionConfig() if params_dtype is None else ExecutionConfig(params_dtype=params_dtype)
    return GPTModel(config, single_rank_layout(config.experts_by_layer()), execution, device=torch.device("meta"))


def model_specs(config: ModelConfig, params_dtype: torch.dtype) -> dict[str, ParamSpec]:
    """``ParamSpec`` of every parameter of ``GPTModel(config)`` in ``params_dtype``, in
    ``named_parameters`` order at PP 1.  The names and sharding tags come from the model code
    itself (``_whole_model``)."""
    model = _whole_model(config, params_dtype)
    state = model.layout
    return {
        name: ParamSpec.of(name, param, placement(param.shape, param_meta(param), state).global_shape)
        for name, param in model.named_parameters()
    }


def model_tensor_names(config: ModelConfig) -> list[str]:
    """Names of every tensor of ``GPTModel(config)``'s ``state_dict`` (parameters and persistent
    buffers) at PP 1: what a checkpoint of that model holds, whichever layout saved it."""
    return list(_whole_model(config).state_dict())


def buffer_names(config: ModelConfig) -> list[str]:
    """Names of the persistent buffers of ``GPTModel(config)`` (the routers' expert biases), in
    ``state_dict`` order."""
    model = _whole_model(config)
    params = dict(model.named_parameters())
    return [name for name in model.state_dict() if name not in params]
