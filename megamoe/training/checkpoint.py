"""Checkpoints on disk: one directory per iteration, one file per rank, a 'latest' marker written last.

Layout (version 1)::

    SAVE/
      latest_checkpointed_iteration.txt   # the iteration number; replaced atomically, after the
                                          # directory below is complete
      iter_0000100/
        metadata.json                     # version, iteration, consumed samples, layout, model
                                          # config, flags, and every parameter's sharding
        rank_00000.pt ...                 # this rank's model shard, optimizer state, RNG states

A save writes into ``iter_XXXXXXX.partial/`` and renames it once every rank has written, so a
crash during a save leaves the previous checkpoint and the marker untouched; ``--keep-last``
prunes older directories only after the marker points at the new one.  Files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from megamoe.parallel.params import param_meta
from megamoe.parallel.random import get_rng_tracker
from megamoe.parallel.state import get_parallel_state

FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
CONVERT_TOOL = "tools/convert_checkpoint.py"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank_{rank:05d}.pt")


def layout_of(model_config, use_distributed_optimizer: bool) -> dict:
    """The parallel layout a checkpoint is tied to."""
    state = get_parallel_state()
    return {
        "world_size": state.world_size,
        "tensor_model_parallel_size": state.tp_size,
        "data_parallel_size": state.dp_size,
        "expert_model_parallel_size": list(model_config.moe_ep_sizes()),
        "use_distributed_optimizer": bool(use_distributed_optimizer),
    }


def _param_layout(model: torch.nn.Module) -> dict:
    out = {}
    for name, param in model.named_parameters():
        meta = param_meta(param)
        out[name] = {
            "local_shape": list(param.shape),
            "dtype": str(param.dtype).replace("torch.", ""),
            "tensor_parallel_dim": meta.tensor_parallel_dim,
            "expert_parallel_size": meta.expert_parallel_size,
            "unpadded_size": meta.unpadded_size,
        }
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


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "rank": state.rank,
    }
    path = rank_file(partial, state.rank)
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    if state.rank == 0:
        metadata = {
            "format": "megamoe",
            "version": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "layout": layout_of(model_config, use_distributed_optimizer),
            "model_config": model_config_dict(model_config),
            "params": _param_layout(model),
            "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        }
        _write_atomic(os.path.join(partial, "metadata.json"), json.dumps(metadata, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        _write_atomic(os.path.join(root, MARKER), str(iteration))
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


def model_config_dict(model_config) -> dict:
    out = {}
    for key, value in vars(model_config).items():
        if key.startswith("_"):
            continue
        out[key] = str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
    return json.loads(json.dumps(out))


def read_metadata(root: str) -> tuple[str, dict] | None:
    """``(directory, metadata)`` of the latest checkpoint under ``root``, or None if there is none."""
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        return None
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    directory = iteration_dir(root, int(text))
    return directory, load_metadata(directory)


def load_metadata(directory: str) -> dict:
    """The validated ``metadata.json`` of one checkpoint directory (``iter_XXXXXXX``)."""
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {directory} is not a complete megamoe checkpoint")
    try:
        metadata = json.load(open(meta_path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from None
    if metadata.get("format") != "megamoe":
        raise CheckpointError(f"{meta_path} is not a megamoe checkpoint")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {metadata.get('version')} is not supported "
            f"(this megamoe reads version {FORMAT_VERSION})"
        )
    return metadata


def _describe(layout: dict) -> str:
    return (
        f"world {layout['world_size']}, TP {layout['tensor_model_parallel_size']}, "
        f"DP {layout['data_parallel_size']}, EP {layout['expert_model_parallel_size']}, "
        f"ZeRO-1 {'on' if layout['use_distributed_optimizer'] else 'off'}"
    )


def check_compatible(directory: str, metadata: dict, current_layout: dict, model_config, *, load_optim: bool) -> None:
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
    saved = metadata["layout"]
    keys = ["world_size", "tensor_model_parallel_size", "expert_model_parallel_size"]
    if load_optim:
        keys.append("use_distributed_optimizer")
    if any(saved[k] != current_layout[k] for k in keys):
        raise CheckpointError(
            f"{directory} was saved in layout ({_describe(saved)}) but this run uses ({_describe(current_layout)}); "
            f"reshard it first: python {CONVERT_TOOL} --load-dir {os.path.dirname(directory)} --save-dir NEW_DIR "
            f"--target-tensor-parallel-size {current_layout['tensor_model_parallel_size']} "
            f"--target-expert-parallel-size {','.join(map(str, current_layout['expert_model_parallel_size'])) or 1} "
            f"--target-world-size {current_layout['world_size']}"
            + (" --target-use-distributed-optimizer" if current_layout["use_distributed_optimizer"] else "")
        )


def load_rank_payload(directory: str, rank: int, device: torch.device, *, mmap: bool = False) -> dict:
    """One rank's file; ``mmap`` maps the tensors from the file instead of reading them (CPU only)."""
    path = rank_file(directory, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint in {directory} is incomplete")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read as a megamoe rank file ({type(err).__name__}: {err})") from None


def load_model_state(model: torch.nn.Module, payload: dict) -> None:
    with torch.no_grad():
        model.load_state_dict(payload["model"], strict=True)


def restore_rng(payload: dict) -> None:
    _set_rng_state(payload["rng"])
