"""Write a version 1 checkpoint from a live run, as megamoe wrote them before format 2, for the
tests of its reader (``megamoe.checkpointing.convert.legacy_reader``; nothing else reads it).

Version 1 (frozen)::

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_XXXXXXX/metadata.json    format "megamoe", version 1, iteration, consumed samples, the
                                       layout, model config, flags, and per parameter its local
                                       shape and sharding tags
    ROOT/iter_XXXXXXX/rank_XXXXX.pt    per rank: {"model": its local state dict (replicas included),
                                       "optimizer": its optimizer state with a format tag, the
                                       layout and its rank, "rank"}

Written without RNG states, as a Hugging Face import was.  Collective over the world.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megamoe.checkpointing.format import dtype_name, model_config_dict
from megamoe.optim.state_dict import OPTIMIZER_SCALARS
from megamoe.parallel.params import param_meta


def save_version_1(root: str, *, iteration: int, consumed_samples: int, model, optimizer, model_config) -> None:
    """Save this rank's ``model`` and ``optimizer`` (a MixedPrecisionOptimizer) under ``root``."""
    state, zero = optimizer.state, optimizer.cfg.use_distributed_optimizer
    directory = os.path.join(root, f"iter_{iteration:07d}")
    layout = {
        "world_size": state.world_size,
        "tensor_model_parallel_size": state.tp_size,
        "data_parallel_size": state.dp_size,
        "expert_model_parallel_size": list(state.moe_ep_sizes),
        "use_distributed_optimizer": zero,
    }
    optim = optimizer.state_dict()
    optimizer_v1 = {
        "format": "megamoe.optim/1",
        "layout": {
            **{key: layout[key] for key in ("world_size", "tensor_model_parallel_size", "data_parallel_size")},
            "expert_model_parallel_sizes": sorted(set(state.moe_ep_sizes)),
            "use_distributed_optimizer": zero,
            "bucket_size": optimizer.cfg.bucket_size if zero else None,
        },
        "rank": state.rank,
        **{key: optim[key] for key in OPTIMIZER_SCALARS},
        "shards": optim["shards"],
    }
    if state.rank == 0:
        os.makedirs(directory)
    dist.barrier(group=state.world_group)
    model_state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    payload = {"model": model_state, "optimizer": optimizer_v1, "rank": state.rank}
    torch.save(payload, os.path.join(directory, f"rank_{state.rank:05d}.pt"))
    dist.barrier(group=state.world_group)
    if state.rank != 0:
        return
    params = {}
    for name, param in model.named_parameters():
        meta = param_meta(param)
        params[name] = {
            "local_shape": list(param.shape),
            "dtype": dtype_name(param.dtype),
            "tensor_parallel_dim": meta.tensor_parallel_dim,
            "expert_parallel_size": meta.expert_parallel_size,
            "unpadded_size": meta.unpadded_size,
        }
    metadata = {
        "format": "megamoe",
        "version": 1,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": layout,
        "model_config": model_config_dict(model_config),
        "params": params,
        "args": {},
    }
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=1)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
