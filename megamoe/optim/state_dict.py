"""The optimizer's checkpointable state: its one schema.

One rank's state, keyed by parameter name (names from ``model.named_parameters()``)::

    {
      "adam_steps": applied (non-skipped) steps, "num_skipped": skipped steps, "lr": float,
      "loss_scaler": {scale, clean_steps, overflows_left},     # OPTIMIZER_SCALARS: equal on every rank
      "shards": {name: {"start", "end",                       # the owned range of the flattened local param
                        "master", "exp_avg", "exp_avg_sq"}},  # OPTIMIZER_KINDS: fp32 [end - start] each
    }

Only tensors and Python values, so ``torch.load(weights_only=True)`` reads it.  The owned ranges
are this rank's ZeRO-1 shards of the gradient buffers (``grad_buffer``), each local tensor whole
without ZeRO-1.  The state records no layout: the ranges are what a layout decides, and
``load_state_dict`` refuses ranges other than this rank's.  A checkpoint
(``megamoe.checkpointing``) stores the scalars as they are and every range as boxes of its
parameter's global tensor, and on load fills ``empty_shards`` of an optimizer of any layout.
"""

from __future__ import annotations

import torch

OPTIMIZER_SCALARS = ("adam_steps", "num_skipped", "lr", "loss_scaler")
OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")


def empty_shards(opt) -> dict[str, dict]:
    """``shards`` of ``opt``'s own ranges (``opt``: a MixedPrecisionOptimizer), zero-filled, for a
    reader to fill in."""
    return {
        p.name: {
            "start": p.start,
            "end": p.end,
            **{kind: torch.zeros(p.end - p.start, device=p.master.device) for kind in OPTIMIZER_KINDS},
        }
        for p in opt.pieces
    }


def optimizer_state_dict(opt) -> dict:
    """``opt``'s state.  Tensors are cloned (a view would save its whole buffer)."""
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
        "adam_steps": opt.adam_steps,
        "num_skipped": opt.num_skipped,
        "lr": opt.lr,
        "loss_scaler": opt.scaler.state_dict(),
        "shards": shards,
    }


def _check(opt, sd: dict) -> None:
    missing = [key for key in (*OPTIMIZER_SCALARS, "shards") if key not in sd]
    if missing:
        raise ValueError(f"not a megamoe optimizer state: it has no {missing}")
    expected = {p.name: (p.start, p.end) for p in opt.pieces}
    got = {name: (s["start"], s["end"]) for name, s in sd["shards"].items()}
    if expected != got:
        differ = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(
            "the optimizer state is not this rank's: its owned (name, range) pairs differ from this rank's "
            f"(another rank, layout, ZeRO-1 setting or bucket size; load a checkpoint to reshard): {differ[:6]}"
        )


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
