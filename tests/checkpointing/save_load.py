"""The distributed bodies of the conversion tests: train, save, load and step the tiny MoE
(``tests/tiny_moe.py``) in a given layout.

The model: ``tiny_config`` with untied embeddings and vocabulary 300 (padded to 384 at TP 1 and
512 at TP 2, so padding rows exist).  EP sizes are per MoE layer, so one model can have two.
Every layout sees the same micro-batches, so the loss of a step does not depend on the layout.
The bodies return their results on rank 0 and None elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.training import checkpoint as ckpt
from tests.checkpointing.convert.version1 import save_version_1
from tests.tiny_moe import GLOBAL_BATCH, SEED, build_model, build_optimizer, forward_backward, full_params, tiny_config

VOCAB = 300


@dataclass(frozen=True)
class Run:
    """A layout: world size, TP, EP per MoE layer, ZeRO-1."""

    world: int
    tp: int
    eps: tuple[int, ...]
    zero: bool


CONFIG = tiny_config(vocab_size=VOCAB, untie_embeddings_and_output_weights=True)


def step(model, opt, index: int) -> float:
    """One optimizer step on global batch ``index``; returns the global loss (lm + aux)."""
    loss = forward_backward(model, opt, index)
    assert not opt.step().skipped
    return loss


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = gather_from_tp_region(model(tokens).logits, model.layout)[..., :VOCAB]
    model.train()
    return logits


def train_save_continue(rank, world, run: Run, save_root: str, steps: int, tokens: torch.Tensor,
                        version1_root: str | None = None) -> dict | None:
    """Train ``steps`` steps in ``run``'s layout, save, then take one more step (the reference a
    converted checkpoint must reproduce).  Returns the saved model's logits on ``tokens`` and
    full parameters, and the next step's loss and full parameters.  ``version1_root``: also save
    the same state there in format version 1."""
    config = CONFIG
    model = build_model(config, run.tp, run.eps)
    opt = build_optimizer(model, zero=run.zero)
    for index in range(steps):
        step(model, opt, index)
    ckpt.save_checkpoint(
        save_root,
        iteration=steps,
        consumed_samples=steps * GLOBAL_BATCH,
        model=model,
        optimizer=opt,
        model_config=config,
        layout=model.layout,
        use_distributed_optimizer=run.zero,
        args={"seed": SEED},
    )
    if version1_root is not None:
        save_version_1(version1_root, iteration=steps, consumed_samples=steps * GLOBAL_BATCH, model=model,
                       optimizer=opt, model_config=config)
    logits = full_logits(model, tokens)
    saved = full_params(model)
    loss = step(model, opt, steps)
    params = full_params(model)
    return {"logits": logits, "saved_params": saved, "next_loss": loss, "next_params": params} if rank == 0 else None


def load_and_step(rank, world, runs: list[tuple[Run, str]], next_index: int) -> list | None:
    """For each (layout, save root): load the checkpoint as the trainer does, take step
    ``next_index``, and return the loaded and the updated full parameters and the loss."""
    out = []
    for run, root in runs:
        model = build_model(CONFIG, run.tp, run.eps)
        loaded = ckpt.open_checkpoint(root, CONFIG, model.layout)
        loaded.load_model(model)
        opt = build_optimizer(model, zero=run.zero)
        loaded.load_optimizer(opt, model)
        loaded.restore_rng()
        loaded = full_params(model)
        loss = step(model, opt, next_index)
        out.append({"loaded_params": loaded, "loss": loss, "params": full_params(model)})
    return out if rank == 0 else None
