"""Write full tensors as a version 2 megamoe checkpoint (``format``), loadable with ``--load``.

Each group of full tensors the conversion streams becomes one file ``full_GGGGG.pt`` holding
each tensor whole (one chunk per global tensor), so memory stays near one layer.  ``finish``
writes one ``shard_RANK.pt`` per rank of the target ``topology`` with that rank's RNG states
(``rng_map``; none when the source has none, as a Hugging Face import), then ``metadata.json``
and the 'latest' marker.  The topology only decides those RNG states and what ``metadata.json``
records as the saving layout: a version 2 checkpoint loads into any layout.
"""

from __future__ import annotations

import os
import uuid

import torch

from megamoe.checkpointing.box_views import model_key, optimizer_key
from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo
from megamoe.checkpointing.format import (
    SavedTopology,
    build_metadata,
    chunk_name,
    dtype_name,
    iteration_dir,
    model_config_dict,
    model_config_from_dict,
    shard_file,
    write_marker,
    write_metadata,
)
from megamoe.checkpointing.integrity import Crc32Writer, tensor_crc32
from megamoe.checkpointing.rng_map import target_rng
from megamoe.optim.state_dict import OPTIMIZER_SCALARS

# The layout flags of a run, as ``pretrain_moe.py`` saves them in ``args``.
_LAYOUT_ARGS = ("pipeline_model_parallel_size", "tensor_model_parallel_size", "expert_model_parallel_size",
                "use_distributed_optimizer")


class ShardedWriter:
    """Writes ``info``'s state into ``root`` (a fresh directory) as saved in ``topology``
    (``target.target_topology``)."""

    def __init__(self, root: str, info: FullStateInfo, topology: SavedTopology) -> None:
        self.root, self.info, self.topology = root, info, topology
        self.config = model_config_from_dict(info.model_config)
        self.directory = iteration_dir(root, info.iteration)
        os.makedirs(self.directory)
        self.checkpoint_id = uuid.uuid4().hex
        self.tensors: dict[str, dict] = {}
        self.files: dict[str, int] = {}  # name: CRC-32 of the file
        if info.buffers:
            self._write_file({model_key(name): tensor for name, tensor in info.buffers.items()})

    def _write_file(self, tensors: dict[str, torch.Tensor], *, rank: int | None = None, rng: dict | None = None,
                    name: str | None = None) -> None:
        name = name or f"full_{len(self.files):05d}.pt"
        payload = {"checkpoint": self.checkpoint_id, "rank": rank, "tensors": {}}
        for key, tensor in tensors.items():
            offsets = [0] * tensor.dim()
            payload["tensors"][chunk_name(key, offsets)] = tensor = tensor.contiguous()
            self.tensors[key] = {
                "shape": list(tensor.shape),
                "dtype": dtype_name(tensor.dtype),
                "chunks": [{"file": name, "offsets": offsets, "sizes": list(tensor.shape),
                            "crc32": tensor_crc32(tensor)}],
            }
        if rng is not None:
            payload["rng"] = rng
        with open(os.path.join(self.directory, name), "wb") as raw:
            out = Crc32Writer(raw)
            torch.save(payload, out)
        self.files[name] = out.crc32

    def write(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write one group's parameters (``{name: {kind: full tensor}}``)."""
        tensors = {}
        for name, state in full.items():
            for kind, tensor in state.items():
                tensors[model_key(name) if kind == PARAM else optimizer_key(kind, name)] = tensor
        self._write_file(tensors)

    def _metadata(self, rng: dict) -> dict:
        args = dict(self.info.args)
        values = {
            "pipeline_model_parallel_size": self.topology.pp,
            "tensor_model_parallel_size": self.topology.tp,
            "expert_model_parallel_size": list(self.topology.expert_model_parallel_size),
            "use_distributed_optimizer": self.topology.use_distributed_optimizer,
        }
        args.update({key: values[key] for key in _LAYOUT_ARGS if key in args})
        optimizer = None
        if self.info.optimizer is not None:
            optimizer = {key: self.info.optimizer[key] for key in OPTIMIZER_SCALARS}
        return build_metadata(
            checkpoint_id=self.checkpoint_id,
            iteration=self.info.iteration,
            consumed_samples=self.info.consumed_samples,
            topology=self.topology,
            model_config=model_config_dict(self.config),
            args=args,
            optimizer=optimizer,
            params={name: spec.to_entry() for name, spec in self.info.specs.items()},
            tensors=self.tensors,
            files={name: {"bytes": os.path.getsize(os.path.join(self.directory, name)), "crc32": crc}
                   for name, crc in self.files.items()},
            rng=rng,
            lr_schedule=self.info.lr_schedule,
        )

    def finish(self, progress=None) -> None:
        """Write every rank's RNG file, then ``metadata.json`` and the 'latest' marker."""
        rng = {}
        if self.info.rng is not None:
            seed = int(self.info.args.get("seed", 0))
            for rank in range(self.topology.world_size):
                states = target_rng(self.info.rng, *self.topology.coordinates(rank), seed)
                self._write_file({}, rank=rank, rng=states, name=shard_file(rank))
                rng[str(rank)] = shard_file(rank)
            if progress is not None:
                progress(f"wrote the RNG states of {self.topology.world_size} ranks ({self.topology.describe()})")
        write_metadata(self.directory, self._metadata(rng))
        write_marker(self.root, self.info.iteration)
