"""The on-disk format of a sharded megamoe checkpoint: the one place that knows it.

Layout (version 1)::

    SAVE/
      latest_checkpointed_iteration.txt   # the iteration number; replaced atomically, after the
                                          # directory below is complete
      iter_0000100/
        metadata.json                     # build_metadata: format, version, iteration, consumed
                                          # samples, layout, model config, flags, and every
                                          # parameter's entry (param_entry)
        rank_00000.pt ...                 # rank_payload: this rank's model shard, optimizer
                                          # state and RNG states

Files are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.  Both the
trainer (``megamoe.training.checkpoint``) and the conversion tools write and read through the
functions below; nothing here depends on the trainer.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

from megamoe.model.config import ModelConfig
from megamoe.parallel.state import ParallelState, build_parallel_state

FORMAT_NAME = "megamoe"
FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
CONVERT_TOOL = "tools/convert_checkpoint.py"
PAYLOAD_KEYS = ("model", "optimizer", "rng", "rank")  # "rng" is absent in Hugging Face imports


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------- paths
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank_{rank:05d}.pt")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """The parallel layout a sharded checkpoint is tied to (``metadata.json``'s ``layout``).

    Which rank sits where is ``megamoe.parallel.state``'s rule, asked through ``state(rank)``.
    """

    world_size: int
    tensor_model_parallel_size: int
    expert_model_parallel_size: tuple[int, ...]  # one per MoE layer, in layer order
    use_distributed_optimizer: bool

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def dp(self) -> int:
        return self.world_size // self.tensor_model_parallel_size

    @classmethod
    def from_metadata(cls, layout: dict) -> "Layout":
        return cls(
            world_size=int(layout["world_size"]),
            tensor_model_parallel_size=int(layout["tensor_model_parallel_size"]),
            expert_model_parallel_size=tuple(int(e) for e in layout["expert_model_parallel_size"]),
            use_distributed_optimizer=bool(layout["use_distributed_optimizer"]),
        )

    def to_metadata(self) -> dict:
        return {
            "world_size": self.world_size,
            "tensor_model_parallel_size": self.tp,
            "data_parallel_size": self.dp,
            "expert_model_parallel_size": list(self.expert_model_parallel_size),
            "use_distributed_optimizer": self.use_distributed_optimizer,
        }

    def describe(self) -> str:
        return (
            f"world {self.world_size}, TP {self.tp}, DP {self.dp}, EP {list(self.expert_model_parallel_size)}, "
            f"ZeRO-1 {'on' if self.use_distributed_optimizer else 'off'}"
        )

    def state(self, rank: int) -> ParallelState:
        """The ``ParallelState`` of ``rank`` in this layout, without process groups."""
        return _groupless_state(self.world_size, self.tp, self.expert_model_parallel_size, rank)

    def rank(self, *, dp_rank: int, tp_rank: int) -> int:
        return self.state(tp_rank).dp_ranks[dp_rank]

    def coordinates(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, tp_rank)`` of a global rank."""
        state = self.state(rank)
        return state.dp_rank, state.tp_rank

    def ep_rank(self, rank: int, ep_size: int) -> int:
        """EP rank of global ``rank`` in the EP groups of size ``ep_size``."""
        return self.state(rank).experts(ep_size).ep_rank

    def holders(self, *, tp_rank: int, ep_size: int | None, ep_rank: int = 0) -> list[int]:
        """Global ranks holding one shard, canonical (lowest) first: a dense shard (``ep_size``
        None) is on every rank of TP rank ``tp_rank``'s DP group, an expert shard on the ranks of
        that DP group at EP rank ``ep_rank`` (one EDP group)."""
        dp_ranks = self.state(tp_rank).dp_ranks
        if ep_size is None:
            return list(dp_ranks)
        return [r for r in dp_ranks if self.ep_rank(r, ep_size) == ep_rank]


@functools.lru_cache(maxsize=4096)
def _groupless_state(world_size: int, tp: int, eps: tuple[int, ...], rank: int) -> ParallelState:
    return build_parallel_state(
        world_size=world_size, rank=rank, tensor_model_parallel_size=tp, expert_model_parallel_sizes=eps,
        create_groups=False,
    )


# ---------------------------------------------------------------------------------- metadata
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_config_dict(model_config) -> dict:
    """A model config (dataclass) as JSON values; dtypes by name."""
    out = {}
    for key, value in vars(model_config).items():
        if key.startswith("_"):
            continue
        out[key] = dtype_name(value) if isinstance(value, torch.dtype) else value
    return json.loads(json.dumps(out))


def model_config_from_dict(saved: dict) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint recorded (``model_config_dict``'s inverse)."""
    fields = {k: v for k, v in saved.items() if not k.startswith("_")}
    fields["params_dtype"] = getattr(torch, str(fields.get("params_dtype", "float32")))
    try:
        return ModelConfig(**fields)
    except TypeError as err:
        raise ValueError(f"the checkpoint's model_config does not match this megamoe's ModelConfig ({err})") from None


def param_entry(*, local_shape, dtype: torch.dtype, tensor_parallel_dim: int | None,
                expert_parallel_size: int | None, unpadded_size: int | None) -> dict:
    """``metadata.json``'s ``params[name]``: one parameter's local shard and its sharding tags."""
    return {
        "local_shape": list(local_shape),
        "dtype": dtype_name(dtype),
        "tensor_parallel_dim": tensor_parallel_dim,
        "expert_parallel_size": expert_parallel_size,
        "unpadded_size": unpadded_size,
    }


def build_metadata(*, iteration: int, consumed_samples: int, layout: Layout, model_config: dict, params: dict,
                   args: dict) -> dict:
    """The contents of ``metadata.json``; ``model_config`` in ``model_config_dict`` form."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": layout.to_metadata(),
        "model_config": model_config,
        "params": params,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }


def write_metadata(directory: str, metadata: dict) -> None:
    write_atomic(os.path.join(directory, METADATA), json.dumps(metadata, indent=1))


def load_metadata(directory: str) -> dict:
    """The validated ``metadata.json`` of one checkpoint directory (``iter_XXXXXXX``)."""
    meta_path = os.path.join(directory, METADATA)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {directory} is not a complete megamoe checkpoint")
    try:
        metadata = json.load(open(meta_path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path} is not a megamoe checkpoint")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {metadata.get('version')} is not supported "
            f"(this megamoe reads version {FORMAT_VERSION})"
        )
    return metadata


def read_marker(root: str) -> int | None:
    """The iteration the 'latest' marker under ``root`` points at, or None if there is no marker."""
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        return None
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def write_marker(root: str, iteration: int) -> None:
    write_atomic(os.path.join(root, MARKER), str(iteration))


def read_metadata(root: str) -> tuple[str, dict] | None:
    """``(directory, metadata)`` of the latest checkpoint under ``root``, or None if there is none."""
    iteration = read_marker(root)
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    return directory, load_metadata(directory)


# ---------------------------------------------------------------------------------- rank files
def rank_payload(*, model: dict, optimizer: dict, rng: dict | None, rank: int) -> dict:
    """One rank file's contents: local model tensors, ``megamoe.optim.state_dict`` state (``{}``
    without optimizer state), RNG states (None: not recorded) and the rank."""
    payload = {"model": model, "optimizer": optimizer, "rank": rank}
    if rng is not None:
        payload["rng"] = rng
    return payload


def load_rank_payload(directory: str, rank: int, device: torch.device, *, mmap: bool = False) -> dict:
    """One rank's file; ``mmap`` maps the tensors from the file instead of reading them (CPU only)."""
    path = rank_file(directory, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint in {directory} is incomplete")
    try:
        payload = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read as a megamoe rank file ({type(err).__name__}: {err})") from None
    required = set(PAYLOAD_KEYS) - {"rng"}
    if not isinstance(payload, dict) or not required <= set(payload) or payload["rank"] != rank:
        raise CheckpointError(f"{path} is not the megamoe rank file of rank {rank}")
    return payload
