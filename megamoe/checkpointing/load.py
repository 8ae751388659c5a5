"""Load a version 2 checkpoint (``format``) into a model and optimizer of any layout.

Each rank reads, for every box it holds (``box_views``: its parameter shards and persistent
buffers; its ZeRO-1 ranges of the fp32 master and Adam moments, or whole local tensors without
ZeRO-1), the overlapping parts of the chunks on disk, wherever and by whichever layout they were
written.  A pipeline stage holds its layers under their global names (the last stage's copy of a
tied input embedding under the embedding's), so it reads them like any other boxes.  No
collective: every rank reads what it needs from the shared files.
"""

from __future__ import annotations

import torch

from megamoe.checkpointing.box_views import (
    model_key,
    model_views,
    optimizer_views,
    persistent_tensors,
    placements,
)
from megamoe.checkpointing.format import CheckpointError, SavedTopology, ShardFiles
from megamoe.checkpointing.param_specs import model_tensor_names
from megamoe.checkpointing.rng_map import rng_source, with_fresh_stream
from megamoe.optim.state_dict import empty_shards
from megamoe.parallel.state import ParallelState


def check_model_tensors(files: ShardFiles, model: torch.nn.Module, state: ParallelState) -> None:
    """Refuse a checkpoint whose model tensors are not those of ``model``'s whole model (its
    ``config``; a pipeline stage holds some of them): a name missing or unknown, or a global
    shape of this rank's tensors that differs (naming both shapes)."""
    where = placements(model, state)
    saved = {key for key in files.tensors if key.startswith("model/")}
    wanted = {model_key(name) for name in model_tensor_names(model.config)}
    if saved != wanted:
        raise CheckpointError(
            f"{files.directory}: its model tensors are not this model's (missing {sorted(wanted - saved)[:5]}, "
            f"unknown {sorted(saved - wanted)[:5]})"
        )
    for name, at in where.items():
        shape = tuple(files.tensors[model_key(name)]["shape"])
        if shape != at.global_shape:
            raise CheckpointError(
                f"{files.directory}: {name} has shape {list(shape)} in the checkpoint but {list(at.global_shape)} "
                "in the model the flags describe"
            )


@torch.no_grad()
def load_model(files: ShardFiles, model: torch.nn.Module, state: ParallelState) -> None:
    """Fill every parameter and persistent buffer of ``model`` from ``files`` (vocabulary padding: zeros)."""
    check_model_tensors(files, model, state)
    for tensor in persistent_tensors(model).values():
        tensor.zero_()
    for view in model_views(model, placements(model, state)):
        files.read_into(view.key, view.box, view.tensor)


def optimizer_state(files: ShardFiles, optimizer, model: torch.nn.Module, state: ParallelState) -> dict:
    """``optimizer``'s ``state_dict()`` for this rank, filled from ``files``."""
    scalars = files.metadata["optimizer"]
    if scalars is None:
        raise CheckpointError(
            f"{files.directory} holds weights but no optimizer state (e.g. imported from Hugging Face): "
            f"train from it with --finetune, or keep its iteration with --no-load-optim"
        )
    shards = empty_shards(optimizer)
    for view in optimizer_views(shards, placements(model, state)):
        files.read_into(view.key, view.box, view.tensor)
    return {**scalars, "shards": shards}


def rng_states(files: ShardFiles, state: ParallelState, seed: int) -> dict | None:
    """The RNG states this rank continues from (``rng_map``), None if the checkpoint has none."""
    saved = SavedTopology.from_metadata(files.metadata["layout"])
    pp, dp, tp, fresh = rng_source(saved_pp=saved.pp, saved_dp=saved.dp, saved_tp=saved.tp, pp_rank=state.pp_rank,
                                   dp_rank=state.dp_rank, tp_rank=state.tp_rank)
    states = files.rng(saved.rank(pp_rank=pp, dp_rank=dp, tp_rank=tp))
    if states is None or not fresh:
        return states
    return with_fresh_stream(states, seed=seed, tp_rank=state.tp_rank)
