"""Read a version 2 megamoe checkpoint (``format``) as full tensors, for the conversion tool.

``format.ShardFiles`` checks every file first (present, of the recorded size, of this
checkpoint, every chunk of the recorded shape, every byte against its CRC-32); ``read`` then
assembles each full tensor from its chunks, which must cover it exactly.  Persistent buffers
(model tensors that are not parameters) are read at once into ``info.buffers``.
"""

from __future__ import annotations

import math
import os

import torch

from megamoe.checkpointing.box_views import model_key, optimizer_key
from megamoe.checkpointing.boxes import Box
from megamoe.checkpointing.convert.accounting import Tally
from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo
from megamoe.checkpointing.format import CheckpointError, SavedTopology, ShardFiles, chunk_name
from megamoe.checkpointing.param_specs import ParamSpec
from megamoe.optim.state_dict import OPTIMIZER_KINDS


class ShardedReader:
    """A ``FullStateReader`` over version 2 checkpoint directory ``directory`` with its ``metadata``."""

    def __init__(self, directory: str, metadata: dict) -> None:
        self.directory = directory
        self.files = ShardFiles(directory, metadata)
        damage = self.files.verify(sorted(metadata["files"]))
        if damage is not None:
            raise CheckpointError(damage)
        self.topology = SavedTopology.from_metadata(metadata["layout"])
        self.tally = Tally()
        # Every tensor in every file, listed in metadata.json or not: one the reader never uses
        # is one this converter does not know, and the conversion refuses to drop it.
        for file, payload in self.files.payloads.items():
            self.tally.expect(os.path.join(directory, file), set(payload["tensors"]))
        specs = {name: ParamSpec.from_entry(name, entry) for name, entry in metadata["params"].items()}
        buffers = {
            key[len("model/"):]: self._full(key) for key in self.files.tensors
            if key.startswith("model/") and key[len("model/"):] not in specs
        }
        optimizer = None
        if metadata["optimizer"] is not None:
            optimizer = {**metadata["optimizer"], "bucket_size": None}
        rng = None
        if metadata["rng"]:
            top = self.topology
            rng = [[[self.files.rng(top.rank(pp_rank=p, dp_rank=d, tp_rank=t)) for t in range(top.tp)]
                    for d in range(top.dp)] for p in range(top.pp)]
        self.info = FullStateInfo.from_metadata(
            metadata,
            specs,
            optimizer=optimizer,
            rng=rng,
            source_topology=self.topology,
            buffers=buffers,
        )

    def _full(self, key: str) -> torch.Tensor:
        if key not in self.files.tensors:
            raise CheckpointError(f"{self.directory}: {key} is not in the checkpoint")
        entry = self.files.tensors[key]
        shape = tuple(entry["shape"])
        chunks = self.files.chunks(key)
        if sum(box.numel for _, box, _ in chunks) != math.prod(shape):
            raise CheckpointError(f"{self.directory}: the chunks of {key} do not cover its shape {list(shape)} once")
        out = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        self.files.read_into(key, Box((0,) * len(shape), shape), out)
        for file, box, _ in chunks:
            self.tally.use(os.path.join(self.directory, file), chunk_name(key, box.offsets))
        return out

    def read(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name in names:
            state = {PARAM: self._full(model_key(name))}
            if self.info.optimizer is not None:
                for kind in OPTIMIZER_KINDS:
                    state[kind] = self._full(optimizer_key(kind, name))
            out[name] = state
        return out

    def close(self) -> None:
        self.files = None
