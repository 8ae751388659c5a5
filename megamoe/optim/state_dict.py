"""The optimizer's checkpointable state, and the layout check on load.

One rank's state, keyed by parameter name (names from ``model.named_parameters()``)::

    {
      "format": "megamoe.optim/1",
      "layout": {world_size, tensor_model_parallel_size, data_parallel_size,
                 expert_model_parallel_sizes, use_distributed_optimizer, bucket_size},
      "rank": global rank that saved it,
      "adam_steps": applied (non-skipped) steps, "num_skipped": skipped steps, "lr": float,
      "loss_scaler": {scale, clean_steps, overflows_left},
      "shards": {name: {"start", "end",              # owned range of the flattened local param
                        "master", "exp_avg", "exp_avg_sq"}},  # fp32 [end - start] each
    }

Only tensors and Python values, so ``torch.load(weights_only=True)`` reads it.  A param's
full local tensor is the concatenation of its ranges over the ranks of its reduction group
(ZeRO-1) or the one range (without), which is what a resharding tool needs.
"""

from __future__ import annotations

import torch

FORMAT = "megamoe.optim/1"


def describe_layout(layout: dict) -> str:
    zero = "on" if layout["use_distributed_optimizer"] else "off"
    bucket = f", bucket size {layout['bucket_size']}" if layout["use_distributed_optimizer"] else ""
    return (
        f"world {layout['world_size']}, TP={layout['tensor_model_parallel_size']}, "
        f"DP={layout['data_parallel_size']}, EP sizes {layout['expert_model_parallel_sizes']}, "
        f"ZeRO-1 (--use-distributed-optimizer) {zero}{bucket}"
    )


def optimizer_state_dict(opt) -> dict:
    """``opt``: a MixedPrecisionOptimizer.  Tensors are cloned (a view would save its whole buffer)."""
    shards = {}
    for piece in opt.pieces:
        assert piece.name not in shards, f"two owned ranges of {piece.name} on one rank"
        moments = opt.adam_state(piece)
        shards[piece.name] = {
            "start": piece.start,
            "end": piece.end,
            "master": piece.master.detach().clone(),
            "exp_avg": moments["exp_avg"].detach().clone(),
            "exp_avg_sq": moments["exp_avg_sq"].detach().clone(),
        }
    return {
        "format": FORMAT,
        "layout": opt.layout(),
        "rank": opt.state.rank,
        "adam_steps": opt.adam_steps,
        "num_skipped": opt.num_skipped,
        "lr": opt.lr,
        "loss_scaler": opt.scaler.state_dict(),
        "shards": shards,
    }


def _check(opt, sd: dict) -> None:
    if sd.get("format") != FORMAT:
        raise ValueError(f"not a megamoe optimizer state (format {sd.get('format')!r}, expected {FORMAT!r})")
    saved, current = sd["layout"], opt.layout()
    if saved != current:
        raise ValueError(
            f"optimizer state was saved with layout [{describe_layout(saved)}] but this run has "
            f"[{describe_layout(current)}]; reshard the checkpoint or load it without its optimizer state"
        )
    if sd["rank"] != opt.state.rank:
        raise ValueError(f"optimizer state of rank {sd['rank']} cannot be loaded on rank {opt.state.rank}")
    expected = {p.name: (p.start, p.end) for p in opt.pieces}
    got = {name: (s["start"], s["end"]) for name, s in sd["shards"].items()}
    if expected != got:
        differ = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(f"optimizer state does not match this model's parameters; differing (name, range): {differ[:6]}")


@torch.no_grad()
def check_and_load(opt, sd: dict) -> None:
    """Validate ``sd`` against ``opt`` and restore masters, Adam moments, scaler and counters
    (the caller copies the masters into the model)."""
    _check(opt, sd)
    for piece in opt.pieces:
        piece.master.copy_(sd["shards"][piece.name]["master"])
    if opt.optimizer is not None:
        if sd["adam_steps"] == 0:
            opt.optimizer.state.clear()
        else:
            by_tensor = {id(p.master): p for p in opt.pieces}
            ordered = [t for group in opt.optimizer.param_groups for t in group["params"]]
            native = opt.optimizer.state_dict()
            native["state"] = {}
            for index, tensor in enumerate(ordered):
                shard = sd["shards"][by_tensor[id(tensor)].name]
                native["state"][index] = {
                    "step": torch.tensor(float(sd["adam_steps"])),
                    "exp_avg": shard["exp_avg"],
                    "exp_avg_sq": shard["exp_avg_sq"],
                }
            if opt.adam_kind.startswith("apex"):
                for group in native["param_groups"]:
                    group["step"] = sd["adam_steps"]  # apex FusedAdam counts steps per group
            opt.optimizer.load_state_dict(native)
    opt.scaler.load_state_dict(sd["loss_scaler"])
    opt.adam_steps = sd["adam_steps"]
    opt.num_skipped = sd["num_skipped"]
    opt.set_lr(sd["lr"])
