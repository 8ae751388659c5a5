"""Read a version 1 megamoe checkpoint (``iter_XXXXXXX/rank_XXXXX.pt``, one file per rank) as
full tensors: what lets the conversion tool turn it into version 2.

Every rank file is opened once, memory-mapped (``torch.load(mmap=True, weights_only=True)``),
and checked against ``metadata.json`` before anything is converted: a missing, truncated or
foreign file, a rank file the layout does not have, a parameter with the wrong shard shape, or an
optimizer state of another format stops the conversion with the file's name.  ``read`` then
assembles the full tensors of a few parameters at a time, so memory stays near one layer:

* model weights: the canonical copy of each (TP rank, EP rank) shard, the other copies
  compared bitwise;
* optimizer state: per shard, the copies (without ZeRO-1) or the owned ranges, which must tile
  the flattened local tensor exactly (with ZeRO-1), of the ranks of its reduction group: the DP
  group for dense parameters, the EDP group for experts;
* each full tensor joined from its blocks where ``megamoe.parallel.sharding`` places them.
"""

from __future__ import annotations

import glob
import math
import os

import torch

from megamoe.checkpointing.convert.accounting import Tally
from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo
from megamoe.checkpointing.format import CheckpointError, SavedTopology
from megamoe.checkpointing.param_specs import ParamSpec
from megamoe.optim.state_dict import OPTIMIZER_KINDS, OPTIMIZER_SCALARS
from megamoe.parallel.sharding import placement


_RANK_FILE_KEYS = ("model", "optimizer", "rank")  # and "rng", absent in imports
# A version 1 rank file holds the optimizer state as the optimizer then wrote it: the schema of
# ``megamoe.optim.state_dict`` plus this format tag, the saving layout and rank.
_V1_OPTIMIZER_FORMAT = "megamoe.optim/1"


def _load_rank_file(path: str, rank: int) -> dict:
    """One version 1 rank file, memory-mapped: ``{"model", "optimizer", "rng", "rank"}``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint in {os.path.dirname(path)} is incomplete")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read as a megamoe rank file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or not set(_RANK_FILE_KEYS) <= set(payload) or payload["rank"] != rank:
        raise CheckpointError(f"{path} is not the megamoe rank file of rank {rank}")
    return payload


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class LegacyReader:
    """A ``FullStateReader`` over version 1 checkpoint directory ``directory`` with its ``metadata``."""

    def __init__(self, directory: str, metadata: dict) -> None:
        self.directory = directory
        self.topology = SavedTopology.from_metadata(metadata["layout"])
        self.tally = Tally()
        self.ep_of = {name: entry["expert_parallel_size"] for name, entry in metadata["params"].items()}
        self.local_shapes = {name: tuple(entry["local_shape"]) for name, entry in metadata["params"].items()}
        specs = {name: ParamSpec.from_legacy_entry(name, entry, self.topology) for name, entry in metadata["params"].items()}
        self._check_rank_files()
        self.payloads = [self._open(rank, specs) for rank in range(self.topology.world_size)]
        optimizer = self._optimizer_scalars()
        self.info = FullStateInfo.from_metadata(
            metadata,
            specs,
            optimizer=optimizer,
            rng=self._rng(),
            source_topology=self.topology,
        )

    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank_{rank:05d}.pt")

    def _check_rank_files(self) -> None:
        expected = {self._path(r) for r in range(self.topology.world_size)}
        for path in sorted(glob.glob(os.path.join(self.directory, "rank_*.pt"))):
            if path not in expected:
                raise CheckpointError(
                    f"{path} is not part of the layout recorded in metadata.json ({self.topology.describe()})"
                )

    def _open(self, rank: int, specs: dict[str, ParamSpec]) -> dict:
        path = self._path(rank)
        payload = _load_rank_file(path, rank)
        model = payload["model"]
        if set(model) != set(specs):
            missing, extra = sorted(set(specs) - set(model)), sorted(set(model) - set(specs))
            raise CheckpointError(
                f"{path}: its model tensors do not match metadata.json (missing {missing[:5]}, unknown {extra[:5]})"
            )
        for name, tensor in model.items():
            if tuple(tensor.shape) != self.local_shapes[name] or tensor.dtype != specs[name].dtype:
                raise CheckpointError(
                    f"{path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, metadata.json says "
                    f"{specs[name].dtype} {self.local_shapes[name]}"
                )
        self.tally.expect(path, {(name, PARAM) for name in model})
        optimizer = payload["optimizer"]
        if optimizer:
            self._check_optimizer(path, rank, optimizer)
            self.tally.expect(path, {(name, kind) for name in optimizer["shards"] for kind in OPTIMIZER_KINDS})
        return payload

    def _check_optimizer(self, path: str, rank: int, optimizer: dict) -> None:
        if optimizer.get("format") != _V1_OPTIMIZER_FORMAT:
            raise CheckpointError(
                f"{path}: optimizer state format {optimizer.get('format')!r} is not supported "
                f"(this converter reads {_V1_OPTIMIZER_FORMAT!r})"
            )
        saved = optimizer["layout"]
        if (saved["world_size"], saved["tensor_model_parallel_size"], saved["use_distributed_optimizer"]) != (
            self.topology.world_size,
            self.topology.tp,
            self.topology.use_distributed_optimizer,
        ) or optimizer["rank"] != rank:
            raise CheckpointError(
                f"{path}: the optimizer state's layout {saved} (rank {optimizer['rank']}) "
                f"contradicts metadata.json ({self.topology.describe()}, rank {rank})"
            )
        for name, shard in optimizer["shards"].items():
            if name not in self.local_shapes:
                raise CheckpointError(f"{path}: optimizer state for unknown parameter {name}")
            size = shard["end"] - shard["start"]
            for kind in OPTIMIZER_KINDS:
                tensor = shard[kind]
                if tensor.dtype != torch.float32 or tuple(tensor.shape) != (size,):
                    raise CheckpointError(
                        f"{path}: optimizer {kind} of {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                        f"float32 ({size},)"
                    )

    def _optimizer_scalars(self) -> dict | None:
        has = [bool(p["optimizer"]) for p in self.payloads]
        if not any(has):
            return None
        if not all(has):
            rank = has.index(False)
            raise CheckpointError(f"{self._path(rank)} has no optimizer state but rank {has.index(True)}'s file has")
        first = self.payloads[0]["optimizer"]
        for rank, payload in enumerate(self.payloads):
            for key in OPTIMIZER_SCALARS:
                if payload["optimizer"][key] != first[key]:
                    raise CheckpointError(
                        f"{self._path(rank)}: optimizer {key} {payload['optimizer'][key]!r} differs from rank 0's "
                        f"{first[key]!r}"
                    )
        scalars = {key: first[key] for key in OPTIMIZER_SCALARS}
        scalars["bucket_size"] = first["layout"].get("bucket_size")
        return scalars

    def _rng(self) -> list[list[list[dict]]] | None:
        """RNG states by (DP rank, TP rank); None when the checkpoint has none."""
        if not all("rng" in p for p in self.payloads):
            return None
        top = self.topology
        return [[[self.payloads[top.rank(dp_rank=d, tp_rank=t)]["rng"] for t in range(top.tp)] for d in range(top.dp)]]

    # ------------------------------------------------------------------ streaming
    def _blocks(self, name: str) -> list[list[int]]:
        """The ranks holding each block of ``name`` (one list per (TP rank, EP rank)), lowest
        first: version 1 has no ETP, so an expert block is on the ranks of one TP rank's DP group
        at one EP rank (an EDP group), a dense block on the whole DP group."""
        top, ep = self.topology, self.ep_of[name]
        blocks = []
        for tp_rank in range(top.tp):
            dp_ranks = top.state(tp_rank).dp_ranks
            for ep_rank in range(ep or 1):
                blocks.append([r for r in dp_ranks if ep is None or top.state(r).experts(ep).ep_rank == ep_rank])
        return blocks

    def _model_shard(self, name: str, holders: list[int]) -> torch.Tensor:
        canonical = self.payloads[holders[0]]["model"][name]
        self.tally.use(self._path(holders[0]), (name, PARAM))
        for rank in holders[1:]:
            if not _bitwise_equal(self.payloads[rank]["model"][name], canonical):
                raise CheckpointError(
                    f"{self._path(rank)}: {name} differs from its copy in {self._path(holders[0])}; "
                    "copies of one shard must be identical"
                )
            self.tally.replica(self._path(rank), (name, PARAM))
        return canonical

    def _optimizer_shard(self, name: str, kind: str, holders: list[int]) -> torch.Tensor:
        """The local tensor of one block, from the ranks of its reduction group."""
        numel = math.prod(self.local_shapes[name])
        pieces = []
        for rank in holders:
            shard = self.payloads[rank]["optimizer"]["shards"].get(name)
            if shard is not None:
                pieces.append((shard["start"], shard["end"], rank, shard[kind]))
        files = ", ".join(self._path(rank) for _, _, rank, _ in pieces) or "no file"
        if not self.topology.use_distributed_optimizer:
            if len(pieces) != len(holders) or any((s, e) != (0, numel) for s, e, _, _ in pieces):
                raise CheckpointError(f"{files}: the optimizer state of {name} does not cover it whole on every rank")
            _, _, first, canonical = pieces[0]
            self.tally.use(self._path(first), (name, kind))
            for _, _, rank, tensor in pieces[1:]:
                if not _bitwise_equal(tensor, canonical):
                    raise CheckpointError(f"{self._path(rank)}: optimizer {kind} of {name} differs from rank {first}'s")
                self.tally.replica(self._path(rank), (name, kind))
            return canonical.view(self.local_shapes[name])
        pieces.sort()
        bounds = [(s, e) for s, e, _, _ in pieces]
        if [0] + [e for _, e in bounds] != [s for s, _ in bounds] + [numel]:
            raise CheckpointError(
                f"{files}: the ZeRO-1 ranges {bounds} of {name}'s optimizer {kind} do not tile its {numel} elements"
            )
        for _, _, rank, _ in pieces:
            self.tally.use(self._path(rank), (name, kind))
        return torch.cat([tensor for _, _, _, tensor in pieces]).view(self.local_shapes[name])

    def _join(self, name: str, blocks: list[tuple[int, torch.Tensor]], what: str) -> torch.Tensor:
        """The full tensor of ``name`` from ``(holding rank, local tensor)`` of every block, each
        placed where the sharding rule puts that rank's block.  Refuses non-zero vocabulary
        padding: dropping it would lose data silently."""
        meta = self.info.specs[name].meta(self.ep_of[name])
        full = None
        for rank, local in blocks:
            at = placement(local.shape, meta, self.topology.state(rank))
            if full is None:
                full = local.new_zeros(at.padded_shape)
            full[at.index] = local
        kept = tuple(slice(0, n) for n in at.global_shape)
        if at.padded_shape != at.global_shape:
            padding = full.clone()
            padding[kept] = 0
            if bool((padding != 0).any()):
                raise CheckpointError(
                    f"{self.directory} ({self.topology.describe()}): {what} of {name} has non-zero values in its "
                    "vocabulary padding; they would be lost by the conversion"
                )
        return full[kept]

    def read(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name in names:
            blocks = self._blocks(name)
            state = {PARAM: self._join(name, [(b[0], self._model_shard(name, b)) for b in blocks], "the weight")}
            if self.info.optimizer is not None:
                for kind in OPTIMIZER_KINDS:
                    parts = [(b[0], self._optimizer_shard(name, kind, b)) for b in blocks]
                    state[kind] = self._join(name, parts, f"optimizer {kind}")
            out[name] = state
        return out

    def close(self) -> None:
        self.payloads = []
