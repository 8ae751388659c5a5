"""The layout-free state every conversion passes through.

A reader (sharded megamoe checkpoint, consolidated checkpoint, Hugging Face export) describes
its checkpoint with a ``FullStateInfo`` and streams, group by group, the full tensors of each
parameter as ``{name: {kind: tensor}}``:

* ``param``: the model weight, in the model's dtype;
* ``master``, ``exp_avg``, ``exp_avg_sq``: the fp32 master weight and Adam moments, same shape
  (present only when the checkpoint carries optimizer state).

Writers take the same dicts and lay them out for their format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch

from megamoe.checkpointing.convert.accounting import Tally
from megamoe.checkpointing.format import SavedTopology
from megamoe.checkpointing.param_specs import ParamSpec
from megamoe.optim.state_dict import OPTIMIZER_KINDS

PARAM = "param"
_LAYER = re.compile(r"^layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Transformer layer index of a parameter name (``layers.3.mlp...`` -> 3), None outside the layers."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def stream_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """Parameter names grouped by what the conversion streams at once: each transformer layer
    (``layers.N``), and each top-level module (embeddings, final norm, output layer), in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = layer_of(name)
        key = f"layers.{layer}" if layer is not None else name.split(".")[0]
        groups.setdefault(key, []).append(name)
    return list(groups.items())


@dataclass
class FullStateInfo:
    model_config: dict  # ``format.model_config_dict`` form; its EP sizes are the source's
    specs: dict[str, ParamSpec]  # every parameter, in ``model.named_parameters()`` order
    iteration: int
    consumed_samples: int
    args: dict
    # The optimizer's scalars (OPTIMIZER_SCALARS, plus "bucket_size": the ZeRO-1 bucketing the
    # run used, or None) when the checkpoint has optimizer state, else None.
    optimizer: dict | None
    # RNG states (``megamoe.training.checkpoint._rng_state`` form) of the source's ranks,
    # ``rng[pp_rank][dp_rank][tp_rank]``; None when the source has none (Hugging Face).
    rng: list[list[list[dict]]] | None
    source_topology: SavedTopology | None  # None for layout-free sources
    # Persistent buffers (model tensors that are not parameters), full and replicated, by name.
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    # The training run's learning-rate curve (``LRSchedule.curve()``), None when not recorded.
    lr_schedule: dict | None = None

    @classmethod
    def from_metadata(cls, metadata: dict, specs: dict[str, ParamSpec], **rest) -> "FullStateInfo":
        """The info of a checkpoint whose metadata holds ``model_config``, ``iteration``,
        ``consumed_samples`` and optionally ``args`` and ``lr_schedule`` (every format writes these
        the same way); ``rest`` gives the fields each format stores its own way."""
        return cls(
            model_config=metadata["model_config"],
            specs=specs,
            iteration=int(metadata["iteration"]),
            consumed_samples=int(metadata["consumed_samples"]),
            args=dict(metadata.get("args", {})),
            lr_schedule=metadata.get("lr_schedule"),
            **rest,
        )

    def kinds(self) -> tuple[str, ...]:
        return (PARAM, *OPTIMIZER_KINDS) if self.optimizer is not None else (PARAM,)

    def check(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Assert that a reader produced every kind of ``name`` with its full shape and dtype
        (the weight in the model's dtype, the optimizer state in fp32)."""
        spec = self.specs[name]
        assert set(state) == set(self.kinds()), (name, sorted(state))
        for kind, tensor in state.items():
            dtype = spec.dtype if kind == PARAM else torch.float32
            assert tuple(tensor.shape) == spec.shape and tensor.dtype == dtype, (name, kind, tensor.dtype, tensor.shape)


class FullStateReader(Protocol):
    info: FullStateInfo
    tally: Tally

    def read(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Full tensors of ``names`` (every kind of ``info.kinds()``), marking what was read in ``tally``."""
        ...

    def close(self) -> None: ...
