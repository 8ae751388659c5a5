"""Write full tensors as a sharded megamoe checkpoint in any layout, one group at a time.

Each group's full tensors are cut into the target's shards at once and staged on disk, one file
per (group, TP rank, EP rank) holding the local model tensors and the distinct optimizer ranges
of that shard; ``finish`` then assembles each rank file from the memory-mapped staged tensors,
so resident memory stays near one layer even when one rank holds the whole model.  The result
is the format of ``megamoe.checkpointing.format`` that training writes, loadable with ``--load``:

* ``model``: every parameter's local shard (vocabulary padded for the target TP);
* ``optimizer``: ``megamoe.optim.state_dict``'s format, with the ranges the target's optimizer
  will own (``optimizer_layout.owned_ranges``), or ``{}`` when the source has no optimizer state;
* ``rng``: the source's states of the rank at the same (DP rank, TP rank), or of the same TP
  rank when the DP rank is new (the model-parallel stream belongs to a TP rank; the default
  streams are seeded alike on every rank).  A TP rank the source did not have gets a fresh
  model-parallel stream of its own.  Omitted when the source has none (Hugging Face).
"""

from __future__ import annotations

import os
import shutil

import torch

from megamoe.checkpointing.format import (
    Layout,
    build_metadata,
    iteration_dir,
    model_config_dict,
    rank_file,
    rank_payload,
    write_marker,
    write_metadata,
)
from megamoe.checkpointing.full_state import OPTIMIZER_KINDS, OPTIMIZER_SCALARS, PARAM, FullStateInfo
from megamoe.checkpointing.layout import ParamSpec, layer_of
from megamoe.checkpointing.optimizer_layout import optimizer_layout, owned_ranges
from megamoe.model.config import ModelConfig
from megamoe.optim.config import OptimizerConfig
from megamoe.optim.state_dict import FORMAT as OPTIMIZER_FORMAT
from megamoe.parallel.random import model_parallel_stream_seed

# The layout flags of a run, as ``pretrain_moe.py`` saves them in ``args``.
_LAYOUT_ARGS = ("tensor_model_parallel_size", "expert_model_parallel_size", "use_distributed_optimizer")
_CUDA_RNG_STATE_BYTES = 16  # torch.cuda.get_rng_state(): seed and offset, 8 bytes each


def target_ep_sizes(specs: dict[str, ParamSpec], config: ModelConfig) -> dict[str, int | None]:
    """EP size of every parameter in a model laid out by ``config`` (None for dense ones)."""
    return {name: config.ep_size_for_layer(layer_of(name)) if spec.is_expert else None for name, spec in specs.items()}


def _fresh_stream(like: torch.Tensor, seed: int) -> torch.Tensor:
    """An RNG state of ``like``'s kind (CPU Mersenne Twister, or CUDA Philox seed + offset) seeded by ``seed``."""
    if like.numel() == _CUDA_RNG_STATE_BYTES:
        return torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8)
    return torch.Generator().manual_seed(seed).get_state()


def target_rng(source: list[list[dict]], dp_rank: int, tp_rank: int, seed: int) -> dict:
    """RNG state of the target rank at (``dp_rank``, ``tp_rank``) from the source's
    ``source[dp][tp]``: the rank at the same coordinates when the source has it, else the same
    TP rank of DP rank 0, else (a TP rank the source lacks) DP rank 0's states with a fresh
    model-parallel stream of its own."""
    if tp_rank < len(source[0]):
        return source[dp_rank][tp_rank] if dp_rank < len(source) else source[0][tp_rank]
    state = dict(source[0][0])
    stream_seed = model_parallel_stream_seed(seed, tp_rank)
    state["tracker"] = {name: _fresh_stream(s, stream_seed) for name, s in state["tracker"].items()}
    return state


class ShardedWriter:
    """Writes ``info``'s state into ``root`` (a fresh directory) in ``layout``; ``config`` is the
    model config with the target's EP sizes (``layout.target_layout``)."""

    def __init__(self, root: str, info: FullStateInfo, layout: Layout, config: ModelConfig) -> None:
        self.root, self.info, self.layout, self.config = root, info, layout, config
        self.directory = iteration_dir(root, info.iteration)
        self.staging = os.path.join(root, "staging")
        os.makedirs(self.staging)
        self.ep_of = target_ep_sizes(info.specs, config)
        self.groups: list[list[str]] = []
        self.bucket_size = None
        self.owned: list[dict[str, tuple[int, int]]] = []
        if info.optimizer is not None:
            self.bucket_size = info.optimizer.get("bucket_size") or OptimizerConfig.bucket_size
            self.owned = [
                owned_ranges(info.specs, self.ep_of, layout, rank=r, bucket_size=self.bucket_size)
                for r in range(layout.world_size)
            ]

    def _stage_path(self, group: int, tp_rank: int, ep_rank: int | None) -> str:
        kind = "dense" if ep_rank is None else f"ep{ep_rank}"
        return os.path.join(self.staging, f"g{group:05d}_tp{tp_rank}_{kind}.pt")

    def write(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        """Stage one group's parameters (``{name: {kind: full tensor}}``)."""
        group = len(self.groups)
        self.groups.append(list(full))
        expert_sizes = {self.ep_of[name] for name in full} - {None}
        assert len(expert_sizes) <= 1, f"one group mixes EP sizes {expert_sizes}"
        ep_size = expert_sizes.pop() if expert_sizes else None
        for tp_rank in range(self.layout.tp):
            for ep_rank in [None] + list(range(ep_size or 0)):
                staged = {}
                for name, state in full.items():
                    ep = self.ep_of[name]
                    if (ep is None) != (ep_rank is None):
                        continue
                    staged.update(self._cut(name, state, tp_rank, ep, ep_rank or 0))
                if staged:
                    torch.save(staged, self._stage_path(group, tp_rank, ep_rank))

    def _cut(self, name: str, state: dict[str, torch.Tensor], tp_rank: int, ep: int | None, ep_rank: int) -> dict:
        spec = self.info.specs[name]

        def shard(tensor: torch.Tensor) -> torch.Tensor:
            return spec.shard(tensor, tp=self.layout.tp, tp_rank=tp_rank, ep_size=ep, ep_rank=ep_rank)

        out = {f"{name}|{PARAM}": shard(state[PARAM])}
        if self.info.optimizer is None:
            return out
        # The ranks holding this shard own ZeRO-1 ranges of it (disjoint), or all of it (without).
        holders = self.layout.holders(tp_rank=tp_rank, ep_size=ep, ep_rank=ep_rank)
        ranges = {self.owned[r][name] for r in holders if name in self.owned[r]}
        for kind in OPTIMIZER_KINDS:
            flat = shard(state[kind]).reshape(-1)
            for start, end in ranges:
                out[f"{name}|{kind}|{start}|{end}"] = flat[start:end].clone()
        return out

    def _rank_payload(self, rank: int) -> dict:
        dp_rank, tp_rank = self.layout.coordinates(rank)
        staged: dict[str, torch.Tensor] = {}
        for group in range(len(self.groups)):
            for ep_size in {self.ep_of[name] for name in self.groups[group]}:
                ep_rank = None if ep_size is None else self.layout.ep_rank(rank, ep_size)
                path = self._stage_path(group, tp_rank, ep_rank)
                staged.update(torch.load(path, mmap=True, weights_only=True))
        model = {name: staged[f"{name}|{PARAM}"] for name in self.info.specs}
        optimizer = {}
        if self.info.optimizer is not None:
            shards = {}
            for name, (start, end) in self.owned[rank].items():
                shards[name] = {"start": start, "end": end}
                shards[name].update({kind: staged[f"{name}|{kind}|{start}|{end}"] for kind in OPTIMIZER_KINDS})
            optimizer = {
                "format": OPTIMIZER_FORMAT,
                "layout": optimizer_layout(self.ep_of, self.layout, bucket_size=self.bucket_size),
                "rank": rank,
                **{key: self.info.optimizer[key] for key in OPTIMIZER_SCALARS},
                "shards": shards,
            }
        rng = None
        if self.info.rng is not None:
            rng = target_rng(self.info.rng, dp_rank, tp_rank, int(self.info.args.get("seed", 0)))
        return rank_payload(model=model, optimizer=optimizer, rng=rng, rank=rank)

    def _metadata(self) -> dict:
        args = dict(self.info.args)
        values = {
            "tensor_model_parallel_size": self.layout.tp,
            "expert_model_parallel_size": list(self.config.expert_model_parallel_size),
            "use_distributed_optimizer": self.layout.use_distributed_optimizer,
        }
        args.update({key: values[key] for key in _LAYOUT_ARGS if key in args})
        return build_metadata(
            iteration=self.info.iteration,
            consumed_samples=self.info.consumed_samples,
            layout=self.layout,
            model_config=model_config_dict(self.config),
            params={name: spec.to_metadata(self.layout, self.ep_of[name]) for name, spec in self.info.specs.items()},
            args=args,
        )

    def finish(self, progress=None) -> None:
        """Assemble every rank file, then ``metadata.json`` and the 'latest' marker; drop the staging."""
        os.makedirs(self.directory)
        for rank in range(self.layout.world_size):
            torch.save(self._rank_payload(rank), rank_file(self.directory, rank))
            if progress is not None:
                progress(f"wrote {rank_file(self.directory, rank)}")
        write_metadata(self.directory, self._metadata())
        write_marker(self.root, self.info.iteration)
        shutil.rmtree(self.staging)
