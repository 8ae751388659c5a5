"""The consolidated checkpoint: one layout-free copy of the full state, readable without megamoe.

Layout (version 1)::

    DIR/
      metadata.json          # format "megamoe-consolidated", version, iteration, consumed samples,
                             # model config, flags, the optimizer's scalars, every parameter's
                             # full shape and sharding tags, the groups and their files, and the
                             # layout it was consolidated from
      00000.safetensors ...  # one file per group (embeddings, each transformer layer, ...):
                             # "param/NAME" the weight, "master/NAME", "exp_avg/NAME",
                             # "exp_avg_sq/NAME" the fp32 optimizer state, all full tensors
                             # (experts in global order, vocabulary unpadded)
      buffers.safetensors    # persistent buffers (model tensors that are not parameters), if any
      rng.pt                 # RNG states of the source's ranks, [pp_rank][dp_rank][tp_rank]
                             # ([dp_rank][tp_rank] before pipeline parallelism; torch.save:
                             # tensors, ints and tuples, read with weights_only)

Any layout can be produced from it again (``--to megamoe``).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.checkpointing.convert.accounting import Tally
from megamoe.checkpointing.convert.full_state import FullStateInfo
from megamoe.checkpointing.format import CheckpointError, SavedTopology, write_atomic
from megamoe.checkpointing.param_specs import ParamSpec

FORMAT = "megamoe-consolidated"
VERSION = 1
METADATA = "metadata.json"
RNG_FILE = "rng.pt"
BUFFERS_FILE = "buffers.safetensors"


def is_consolidated(directory: str) -> bool:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        return False
    try:
        return json.load(open(path)).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


class ConsolidatedWriter:
    def __init__(self, root: str, info: FullStateInfo) -> None:
        self.root, self.info = root, info
        os.makedirs(root)
        self.groups: list[dict] = []

    def write(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        filename = f"{len(self.groups):05d}.safetensors"
        tensors = {f"{kind}/{name}": t.contiguous() for name, state in full.items() for kind, t in state.items()}
        save_file(tensors, os.path.join(self.root, filename))
        self.groups.append({"file": filename, "params": list(full)})

    def finish(self, progress=None) -> None:
        info = self.info
        if info.rng is not None:
            torch.save(info.rng, os.path.join(self.root, RNG_FILE))
        if info.buffers:
            save_file({name: t.contiguous() for name, t in info.buffers.items()}, os.path.join(self.root, BUFFERS_FILE))
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "iteration": info.iteration,
            "consumed_samples": info.consumed_samples,
            "model_config": info.model_config,
            "args": info.args,
            "lr_schedule": info.lr_schedule,
            "optimizer": info.optimizer,
            "params": {name: spec.to_entry() for name, spec in info.specs.items()},
            "groups": self.groups,
            "source_layout": info.source_topology.to_metadata() if info.source_topology else None,
        }
        write_atomic(os.path.join(self.root, METADATA), json.dumps(metadata, indent=1))


class ConsolidatedReader:
    """A ``FullStateReader`` over a consolidated directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        path = os.path.join(root, METADATA)
        try:
            metadata = json.load(open(path))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} cannot be read ({err})") from None
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a consolidated megamoe checkpoint")
        if metadata.get("version") != VERSION:
            raise CheckpointError(
                f"{path}: consolidated format version {metadata.get('version')} is not supported "
                f"(this megamoe reads version {VERSION})"
            )
        specs = {name: ParamSpec.from_entry(name, entry) for name, entry in metadata["params"].items()}
        rng_path = os.path.join(root, RNG_FILE)
        rng = torch.load(rng_path, weights_only=True) if os.path.isfile(rng_path) else None
        if rng is not None and isinstance(rng[0][0], dict):
            rng = [rng]  # written before pipeline parallelism: one stage's [dp_rank][tp_rank]
        layout = metadata.get("source_layout")
        self.info = FullStateInfo.from_metadata(
            metadata,
            specs,
            optimizer=metadata.get("optimizer"),
            rng=rng,
            source_topology=SavedTopology.from_metadata(layout) if layout else None,
        )
        self.tally = Tally()
        buffers_path = os.path.join(root, BUFFERS_FILE)
        if os.path.isfile(buffers_path):
            with safe_open(buffers_path, framework="pt") as handle:
                self.info.buffers = {name: handle.get_tensor(name) for name in handle.keys()}
            self.tally.expect(buffers_path, set(self.info.buffers))
            for name in self.info.buffers:
                self.tally.use(buffers_path, name)
        self.file_of: dict[str, str] = {}
        self.handles = {}
        kinds = self.info.kinds()
        for group in metadata["groups"]:
            file = os.path.join(root, group["file"])
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is missing: the consolidated checkpoint in {root} is incomplete")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as err:  # safetensors raises its own error types for damaged files
                raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {err})") from None
            self.handles[file] = handle
            self.tally.expect(file, set(handle.keys()))
            for name in group["params"]:
                self.file_of[name] = file
                for kind in kinds:
                    if f"{kind}/{name}" not in handle.keys():
                        raise CheckpointError(f"{file} has no tensor {kind}/{name}")
        unlisted = set(specs) - set(self.file_of)
        if unlisted:
            raise CheckpointError(f"{path}: parameters {sorted(unlisted)[:5]} are in no group file")

    def read(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name in names:
            spec, file = self.info.specs[name], self.file_of[name]
            state = {}
            for kind in self.info.kinds():
                key = f"{kind}/{name}"
                tensor = self.handles[file].get_tensor(key)
                expected_dtype = spec.dtype if kind == "param" else torch.float32
                if tuple(tensor.shape) != spec.shape or tensor.dtype != expected_dtype:
                    raise CheckpointError(
                        f"{file}: {key} is {tensor.dtype} {tuple(tensor.shape)}, expected {expected_dtype} {spec.shape}"
                    )
                self.tally.use(file, key)
                state[kind] = tensor
            out[name] = state
        return out

    def close(self) -> None:
        self.handles = {}
