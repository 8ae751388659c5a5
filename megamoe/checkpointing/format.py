"""The on-disk format of a megamoe checkpoint: the one place that knows it.

Layout (version 2)::

    SAVE/
      latest_checkpointed_iteration.txt   # the iteration number; replaced atomically, once every
                                          # file of the directory below is complete
      iter_0000100/
        metadata.json                     # build_metadata: iteration, consumed samples, the
                                          # layout it was saved in, model config, flags, the
                                          # optimizer's scalars, every parameter's global shape
                                          # and sharding tags, and every global tensor's chunks
        shard_00000.pt ...                # one file per rank: the chunks that rank wrote, its
                                          # RNG states, the checkpoint's id

``metadata.json`` records the CRC-32 of every chunk and of every file, and its own
(``integrity``): a damaged byte anywhere is refused on load, naming the file and the tensor.

Every global tensor (``box_views``: model weights and persistent buffers, fp32 master and Adam
moments) is stored once, as chunks: boxes ``(offsets, sizes)`` of the global tensor, each in one
file.  A rank of any layout loads by reading the chunks that overlap the boxes it holds, so a
checkpoint loads into any PP, TP, EP, DP and ZeRO-1 layout: a pipeline stage's model names its
layers by their global index, so a tensor's key does not depend on the stage that holds it.  Files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.

Version 1 (one ``rank_XXXXX.pt`` per rank holding its whole local state, replicas included) is
read only by the conversion tool, which turns it into version 2.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from dataclasses import dataclass

import torch

from megamoe.checkpointing.boxes import Box
from megamoe.checkpointing.integrity import METADATA_CRC, file_crc32, metadata_crc32, tensor_crc32
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.state import ParallelState, build_parallel_state

FORMAT_NAME = "megamoe"
FORMAT_VERSION = 2
LEGACY_VERSION = 1  # one file per rank; read by the conversion tool only
MARKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
CONVERT_TOOL = "tools/convert_checkpoint.py"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------- paths
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def published_iterations(root: str) -> list[int]:
    """The iterations of the checkpoint directories under ``root``, ascending (not the
    ``.partial`` ones of saves still running or crashed); [] when ``root`` is not a directory."""
    if not os.path.isdir(root):
        return []
    return sorted(int(name[len("iter_"):]) for name in os.listdir(root) if re.fullmatch(r"iter_\d+", name))


def shard_file(rank: int) -> str:
    """Name of the file rank ``rank`` writes (inside the iteration directory)."""
    return f"shard_{rank:05d}.pt"


def chunk_name(key: str, offsets) -> str:
    """Name of one chunk inside its file: the tensor's key and the chunk's offsets."""
    return f"{key}@{','.join(map(str, offsets))}"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class SavedTopology:
    """The parallel layout a checkpoint was saved in (``metadata.json``'s ``layout``): which rank
    wrote which shard file and holds which RNG states.  Any layout loads the checkpoint.

    Which rank sits where is ``megamoe.parallel.rank_lists``'s rule, asked through ``state(rank)``:
    PP outermost (``global rank = pp_rank x world / PP + rank in the stage``), then DP and TP
    inside each stage.  Which layers a stage held does not matter to the checkpoint (every
    tensor is stored under its PP 1 name), so the topology records only PP's size.
    """

    world_size: int
    tensor_model_parallel_size: int
    expert_model_parallel_size: tuple[int, ...]  # one per MoE layer, in layer order
    use_distributed_optimizer: bool
    # ETP splits every expert and, with EP, folds the expert groups over the world; sequence
    # parallelism changes no parameter but moves the ZeRO-1 shards of the TP-replicated ones
    # (they are reduced over DP x TP).  Absent from older metadata: ETP = TP, no SP, PP 1.
    expert_tensor_parallel_size: int | None = None  # None: TP
    sequence_parallel: bool = False
    pipeline_model_parallel_size: int = 1

    @property
    def etp(self) -> int:
        return self.tp if self.expert_tensor_parallel_size is None else self.expert_tensor_parallel_size

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def stage_size(self) -> int:
        """The ranks of one pipeline stage: the world over PP."""
        return self.world_size // self.pp

    @property
    def dp(self) -> int:
        return self.stage_size // self.tensor_model_parallel_size

    @classmethod
    def from_metadata(cls, saved: dict) -> "SavedTopology":
        return cls(
            world_size=int(saved["world_size"]),
            tensor_model_parallel_size=int(saved["tensor_model_parallel_size"]),
            expert_model_parallel_size=tuple(int(e) for e in saved["expert_model_parallel_size"]),
            use_distributed_optimizer=bool(saved["use_distributed_optimizer"]),
            expert_tensor_parallel_size=saved.get("expert_tensor_parallel_size"),
            sequence_parallel=bool(saved.get("sequence_parallel", False)),
            pipeline_model_parallel_size=int(saved.get("pipeline_model_parallel_size", 1)),
        )

    def to_metadata(self) -> dict:
        return {
            "world_size": self.world_size,
            "pipeline_model_parallel_size": self.pp,
            "tensor_model_parallel_size": self.tp,
            "data_parallel_size": self.dp,
            "expert_model_parallel_size": list(self.expert_model_parallel_size),
            "use_distributed_optimizer": self.use_distributed_optimizer,
            "expert_tensor_parallel_size": self.etp,
            "sequence_parallel": self.sequence_parallel,
        }

    def describe(self) -> str:
        return (
            f"world {self.world_size}, {f'PP {self.pp}, ' if self.pp > 1 else ''}TP {self.tp}, DP {self.dp}, "
            f"EP {list(self.expert_model_parallel_size)}, ETP {self.etp}, "
            f"SP {'on' if self.sequence_parallel else 'off'}, "
            f"ZeRO-1 {'on' if self.use_distributed_optimizer else 'off'}"
        )

    def state(self, rank: int) -> ParallelState:
        """The ``ParallelState`` of ``rank`` in this layout, without process groups (and without
        its layers: the topology does not record the stages' split)."""
        return _groupless_state(
            self.world_size, self.tp, self.expert_model_parallel_size, rank, self.etp, self.sequence_parallel, self.pp
        )

    def rank(self, *, pp_rank: int = 0, dp_rank: int, tp_rank: int) -> int:
        return self.state(pp_rank * self.stage_size + tp_rank).dp_ranks[dp_rank]

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        state = self.state(rank)
        return state.pp_rank, state.dp_rank, state.tp_rank


@functools.lru_cache(maxsize=4096)
def _groupless_state(
    world_size: int, tp: int, eps: tuple[int, ...], rank: int, etp: int, sequence_parallel: bool, pp: int
) -> ParallelState:
    parallel = ParallelConfig(world_size=world_size, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                              expert_model_parallel_size=tuple(sorted(set(eps))), expert_tensor_parallel_size=etp,
                              pipeline_model_parallel_size=pp)
    return build_parallel_state(parallel, rank=rank, create_groups=False)


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
    """The ``ModelConfig`` a checkpoint recorded (``model_config_dict``'s inverse).  Checkpoints
    written before the architecture had a config of its own also recorded the layout and
    execution choices beside it (EP sizes, precision, recomputation, ...); those are not model."""
    not_model = {f.name for cls in (ParallelConfig, ExecutionConfig) for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in saved.items() if not k.startswith("_") and k not in not_model}
    try:
        return ModelConfig(**fields)
    except TypeError as err:
        raise ValueError(f"the checkpoint's model_config does not match this megamoe's ModelConfig ({err})") from None


def build_metadata(*, checkpoint_id: str, iteration: int, consumed_samples: int, topology: SavedTopology,
                   model_config: dict, args: dict, optimizer: dict | None, params: dict, tensors: dict,
                   files: dict, rng: dict, lr_schedule: dict | None = None) -> dict:
    """The contents of ``metadata.json``.

    ``model_config``: ``model_config_dict`` form.  ``optimizer``: the optimizer's scalars
    (``megamoe.optim.state_dict``: adam_steps, num_skipped, lr, loss_scaler), None without
    optimizer state.  ``params``: ``{name: ParamSpec.to_entry()}``.  ``tensors``: ``{key: {"shape",
    "dtype", "chunks": [{"file", "offsets", "sizes", "crc32"}]}}``.  ``files``: ``{file: {"bytes",
    "crc32"}}``.  The CRC-32s are ``integrity``'s.
    ``rng``: ``{str(rank): file}``, the file holding each saving rank's RNG states.
    ``lr_schedule``: the training run's ``LRSchedule.curve()``, None when none was recorded (a
    Hugging Face import).
    """
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": topology.to_metadata(),
        "model_config": model_config,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "optimizer": optimizer,
        "params": params,
        "tensors": tensors,
        "files": files,
        "rng": rng,
        "lr_schedule": lr_schedule,
    }


def write_metadata(directory: str, metadata: dict) -> None:
    """Write ``metadata.json`` with its own checksum (``integrity.METADATA_CRC``)."""
    signed = {**metadata, METADATA_CRC: metadata_crc32(metadata)}
    write_atomic(os.path.join(directory, METADATA), json.dumps(signed, indent=1))


def load_metadata(directory: str, *, legacy: bool = False) -> dict:
    """The validated ``metadata.json`` of one checkpoint directory (``iter_XXXXXXX``); ``legacy``
    accepts version 1 too (the conversion tool), else version 1 is refused with the command
    that converts it."""
    meta_path = os.path.join(directory, METADATA)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {directory} is not a complete megamoe checkpoint")
    with open(meta_path, "rb") as f:
        raw = f.read()
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is damaged: it is not valid UTF-8 JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path} is not a megamoe checkpoint")
    if metadata.get("version") == LEGACY_VERSION and not legacy:
        root = os.path.dirname(os.path.abspath(directory))
        raise CheckpointError(
            f"{meta_path}: this checkpoint is in megamoe's version 1 format (one file per rank); convert it "
            f"once with: python {CONVERT_TOOL} --load-dir {root} --save-dir NEW_DIR, then --load NEW_DIR"
        )
    if metadata.get("version") not in ((LEGACY_VERSION, FORMAT_VERSION) if legacy else (FORMAT_VERSION,)):
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {metadata.get('version')} is not supported "
            f"(this megamoe reads version {FORMAT_VERSION})"
        )
    if METADATA_CRC in metadata and metadata[METADATA_CRC] != metadata_crc32(metadata):
        raise CheckpointError(f"{meta_path} is damaged: its contents do not match the checksum stored in it")
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


def read_metadata(root: str, *, legacy: bool = False) -> tuple[str, dict] | None:
    """``(directory, metadata)`` of the checkpoint ``root`` names (``checkpoint_dir``), or None
    when it names none."""
    directory = checkpoint_dir(root)
    return None if directory is None else (directory, load_metadata(directory, legacy=legacy))


def checkpoint_dir(root: str) -> str | None:
    """The checkpoint directory ``root`` names: the one its 'latest' marker points at (a save
    root), or ``root`` itself when it is one iteration's directory (it holds ``metadata.json``).
    None when ``root`` holds no checkpoint: a new run.  A root that holds iteration directories
    but no marker is refused: starting afresh would silently drop them."""
    iteration = read_marker(root)
    if iteration is not None:
        return iteration_dir(root, iteration)
    if os.path.isfile(os.path.join(root, METADATA)):
        return root
    published = [os.path.basename(iteration_dir(root, i)) for i in published_iterations(root)]
    if published:
        raise CheckpointError(
            f"{root} holds checkpoint directories ({', '.join(published[-3:])}) but no {MARKER}: give one of "
            f"them itself, or write the iteration to load into {os.path.join(root, MARKER)}"
        )
    return None


# ---------------------------------------------------------------------------------- shard files
class ShardFiles:
    """The files of a version 2 checkpoint directory, checked against ``metadata.json`` and
    memory-mapped.  Construction refuses, naming the file, a missing file, one whose size is not
    the recorded one (truncated), one that cannot be read, one of another checkpoint (its id
    differs, or metadata.json does not list it), and a chunk that is absent or of the wrong
    shape or dtype; so a broken checkpoint stops before any training step."""

    def __init__(self, directory: str, metadata: dict) -> None:
        self.directory, self.metadata = directory, metadata
        self.tensors = metadata["tensors"]
        self.payloads: dict[str, dict] = {}
        listed = set(metadata["files"])
        for path in sorted(glob.glob(os.path.join(directory, "shard_*.pt"))):
            if os.path.basename(path) not in listed:
                raise CheckpointError(f"{path} is not listed in {METADATA}: it belongs to another checkpoint")
        for name, entry in metadata["files"].items():
            self.payloads[name] = self._open(os.path.join(directory, name), entry["bytes"], metadata["checkpoint_id"])
        for key, entry in self.tensors.items():
            for chunk in entry["chunks"]:
                tensor = self.payloads[chunk["file"]]["tensors"].get(chunk_name(key, chunk["offsets"]))
                wrong = tensor is None or list(tensor.shape) != list(chunk["sizes"])
                if wrong or dtype_name(tensor.dtype) != entry["dtype"]:
                    raise CheckpointError(
                        f"{os.path.join(directory, chunk['file'])}: chunk {chunk_name(key, chunk['offsets'])} is "
                        f"missing or not {entry['dtype']} {chunk['sizes']} as {METADATA} says"
                    )

    @staticmethod
    def _open(path: str, size: int, checkpoint_id: str) -> dict:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint in {os.path.dirname(path)} is incomplete")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(
                f"{path} is {actual} bytes but {METADATA} recorded {size}: it is truncated or was replaced"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises several types for damaged or foreign files
            raise CheckpointError(
                f"{path} cannot be read as a megamoe shard file ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(payload, dict) or payload.get("checkpoint") != checkpoint_id:
            raise CheckpointError(
                f"{path} belongs to another checkpoint (its id is not {checkpoint_id}, the one in {METADATA})"
            )
        return payload

    def verify(self, names) -> str | None:
        """Check the files ``names`` against their CRC-32s in ``metadata.json`` (reading each
        whole); one line naming the first damaged file and, where one is, the damaged tensor.
        None when all match (or the checkpoint predates checksums)."""
        for name in names:
            path, recorded = os.path.join(self.directory, name), self.metadata["files"][name].get("crc32")
            if recorded is None or file_crc32(path) == recorded:
                continue
            stored = self.payloads[name]["tensors"]
            for key, entry in self.tensors.items():
                for chunk in entry["chunks"]:
                    if chunk["file"] != name:
                        continue
                    if tensor_crc32(stored[chunk_name(key, chunk["offsets"])]) != chunk["crc32"]:
                        return (f"{path} is damaged: tensor {key} (chunk at offsets {chunk['offsets']}) does not "
                                f"match its checksum in {METADATA}")
            return f"{path} is damaged: its bytes do not match the checksum in {METADATA} (its RNG states or structure)"
        return None

    def chunks(self, key: str) -> list[tuple[str, Box, torch.Tensor]]:
        """``(file, box, tensor)`` of every chunk of global tensor ``key``."""
        return [
            (chunk["file"], Box(tuple(chunk["offsets"]), tuple(chunk["sizes"])),
             self.payloads[chunk["file"]]["tensors"][chunk_name(key, chunk["offsets"])])
            for chunk in self.tensors[key]["chunks"]
        ]

    def read_into(self, key: str, box: Box, out: torch.Tensor) -> None:
        """Copy box ``box`` of global tensor ``key`` into ``out`` (a tensor of ``box.sizes``)."""
        for _, stored, tensor in self.chunks(key):
            common = box.intersect(stored)
            if common is not None:
                out[common.within(box)].copy_(tensor[common.within(stored)])

    def rng(self, rank: int) -> dict | None:
        """The RNG states saving rank ``rank`` recorded, None if the checkpoint has none (imports)."""
        name = self.metadata["rng"].get(str(rank))
        return None if name is None else self.payloads[name]["rng"]
