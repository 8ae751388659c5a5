"""Saving and loading a training run's checkpoint: the collective steps around the on-disk format.

The format (paths, metadata, rank files, the 'latest' marker) lives in
``megamoe.checkpointing.format``.  A save writes into ``iter_XXXXXXX.partial/`` and renames it
once every rank has written, so a crash during a save leaves the previous checkpoint and the
marker untouched; ``--keep-last`` prunes older directories only after the marker points at the
new one.
"""

from __future__ import annotations

import os
import random
import shutil

import torch
import torch.distributed as dist

from megamoe.checkpointing.format import (
    CONVERT_TOOL,
    CheckpointError,
    Layout,
    build_metadata,
    iteration_dir,
    load_rank_payload,
    model_config_dict,
    param_entry,
    rank_file,
    rank_payload,
    read_metadata,
    write_marker,
    write_metadata,
)
from megamoe.parallel.params import param_meta
from megamoe.parallel.random import get_rng_tracker
from megamoe.parallel.state import get_parallel_state

__all__ = [
    "CheckpointError", "check_compatible", "layout_of", "load_model_state", "load_rank_payload", "rank_file",
    "read_metadata", "restore_rng", "save_checkpoint",
]


def layout_of(model_config, use_distributed_optimizer: bool) -> Layout:
    """The parallel layout of this run."""
    state = get_parallel_state()
    return Layout(
        world_size=state.world_size,
        tensor_model_parallel_size=state.tp_size,
        expert_model_parallel_size=tuple(model_config.moe_ep_sizes()),
        use_distributed_optimizer=bool(use_distributed_optimizer),
    )


def _param_entries(model: torch.nn.Module) -> dict:
    out = {}
    for name, param in model.named_parameters():
        meta = param_meta(param)
        out[name] = param_entry(
            local_shape=param.shape,
            dtype=param.dtype,
            tensor_parallel_dim=meta.tensor_parallel_dim,
            expert_parallel_size=meta.expert_parallel_size,
            unpadded_size=meta.unpadded_size,
        )
    return out


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    root: str,
    *,
    iteration: int,
    consumed_samples: int,
    model: torch.nn.Module,
    optimizer,
    model_config,
    use_distributed_optimizer: bool,
    args: dict,
    keep_last: int = 0,
) -> str:
    """Collective over the world: every rank writes its file, rank 0 publishes.  Returns the directory."""
    state = get_parallel_state()
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    if state.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    payload = rank_payload(
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        rng=_rng_state(),
        rank=state.rank,
    )
    path = rank_file(partial, state.rank)
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    if state.rank == 0:
        metadata = build_metadata(
            iteration=iteration,
            consumed_samples=consumed_samples,
            layout=layout_of(model_config, use_distributed_optimizer),
            model_config=model_config_dict(model_config),
            params=_param_entries(model),
            args=args,
        )
        write_metadata(partial, metadata)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        write_marker(root, iteration)
        if keep_last:
            _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    iterations = sorted(
        int(name[len("iter_"):]) for name in os.listdir(root)
        if name.startswith("iter_") and name[len("iter_"):].isdigit()
    )
    for old in iterations[:-keep_last]:
        shutil.rmtree(iteration_dir(root, old), ignore_errors=True)


def check_compatible(directory: str, metadata: dict, current: Layout, model_config, *, load_optim: bool) -> None:
    saved_model = metadata["model_config"]
    current_model = model_config_dict(model_config)
    # The EP sizes are part of the layout (compared below, one per MoE layer), not of the model:
    # "--expert-model-parallel-size 2" and "2,2" are the same layout.  How activations are kept
    # and which GEMM path runs do not change the weights either.
    not_model = ("params_dtype", "expert_model_parallel_size", "moe_grouped_gemm", "recompute_granularity",
                 "recompute_num_layers")
    differ = [k for k in current_model if saved_model.get(k) != current_model[k] and k not in not_model]
    if differ:
        details = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {current_model[k]!r}" for k in differ)
        raise CheckpointError(f"{directory} holds a different model ({details})")
    saved = Layout.from_metadata(metadata["layout"])
    same = (saved.world_size, saved.tp, saved.expert_model_parallel_size) == (
        current.world_size, current.tp, current.expert_model_parallel_size)
    if not same or (load_optim and saved.use_distributed_optimizer != current.use_distributed_optimizer):
        raise CheckpointError(
            f"{directory} was saved in layout ({saved.describe()}) but this run uses ({current.describe()}); "
            f"reshard it first: python {CONVERT_TOOL} --load-dir {os.path.dirname(directory)} --save-dir NEW_DIR "
            f"--target-tensor-parallel-size {current.tp} "
            f"--target-expert-parallel-size {','.join(map(str, current.expert_model_parallel_size)) or 1} "
            f"--target-world-size {current.world_size}"
            + (" --target-use-distributed-optimizer" if current.use_distributed_optimizer else "")
        )


def load_model_state(model: torch.nn.Module, payload: dict) -> None:
    with torch.no_grad():
        model.load_state_dict(payload["model"], strict=True)


def restore_rng(payload: dict) -> None:
    _set_rng_state(payload["rng"])
