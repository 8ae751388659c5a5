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

from megamoe.checkpointing.box_views import model_views, optimizer_views, placements
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.training import checkpoint as ckpt
from tests.checkpointing.convert.version1 import save_version_1
from tests.tiny_moe import (
    GLOBAL_BATCH,
    SEED,
    build_model,
    build_optimizer,
    forward_backward,
    full_params,
    tiny_config,
    train_logged,
)

VOCAB = 300


@dataclass(frozen=True)
class Run:
    """A layout: world size, TP, EP per MoE layer, ZeRO-1, PP."""

    world: int
    tp: int
    eps: tuple[int, ...]
    zero: bool
    pp: int = 1


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


def build_run_model(config, run: Run):
    """Groups of ``run``'s layout (PP included) over the running world and ``config``'s model in
    it, fp32, initialised from ``SEED`` (a pipeline stage holds its layers only)."""
    return build_model(config, run.tp, run.eps, pipeline={"pipeline_model_parallel_size": run.pp})


def held_views(model, opt) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """``(key, offsets, sizes, tensor)`` of every box of model weights and optimizer state this
    rank holds (``box_views``), pipeline replicas included: what a load must have filled."""
    where = placements(model, model.layout)
    views = model_views(model, where) + optimizer_views(opt.state_dict()["shards"], where)
    return [(v.key, v.box.offsets, v.box.sizes, v.tensor.clone()) for v in views]


def save_in(model, opt, config, run: Run, root: str, iteration: int) -> None:
    ckpt.save_checkpoint(root, iteration=iteration, consumed_samples=iteration * GLOBAL_BATCH, model=model,
                         optimizer=opt, model_config=config, layout=model.layout, use_distributed_optimizer=run.zero,
                         args={"seed": SEED})


def train_then_reshard(rank, world, config, first: Run, steps: int, chain: list[tuple[Run, int]],
                       roots: list[str]) -> list:
    """Train ``steps`` steps in layout ``first`` (PP 1) and save to ``roots[0]``; then for each
    ``(run, source)`` of ``chain`` (the i-th saving to ``roots[i + 1]``): load ``roots[source]``
    in ``run``'s layout, as the trainer does, and save it again.  Returns this rank's
    ``held_views`` after each load."""
    model = build_run_model(config, first)
    opt = build_optimizer(model, zero=first.zero)
    for index in range(steps):
        step(model, opt, index)
    save_in(model, opt, config, first, roots[0], steps)
    out = []
    for i, (run, source) in enumerate(chain):
        model, opt, iteration = load_in(config, run, roots[source])
        out.append(held_views(model, opt))
        save_in(model, opt, config, run, roots[i + 1], iteration)
    return out


def load_in(config, run: Run, root: str):
    """``config``'s model and optimizer in ``run``'s layout, loaded from ``root`` as the trainer
    loads (weights, optimizer state, RNG states); returns them and the checkpoint's iteration."""
    model = build_run_model(config, run)
    loaded = ckpt.open_checkpoint(root, config, model.layout)
    loaded.load_model(model)
    opt = build_optimizer(model, zero=run.zero)
    loaded.load_optimizer(opt, model)
    loaded.restore_rng()
    return model, opt, loaded.iteration


def continue_elsewhere(rank, world, config, saved: Run, steps: int, more: int, root: str, loads: list[Run]):
    """Train ``steps`` steps in ``saved``'s layout through the trainer's step (the pipeline
    schedule at PP > 1), save to ``root`` and take ``more`` steps: the reference.  Then for each
    of ``loads``, load ``root`` in its layout and take the same ``more`` steps.  Returns on rank 0
    the logged records of those steps (``train_logged``, without its schedule), the reference's first."""
    model = build_run_model(config, saved)
    opt = build_optimizer(model, zero=saved.zero)
    train_logged(model, opt, steps)
    save_in(model, opt, config, saved, root, steps)
    out = [train_logged(model, opt, more, first_step=steps)]
    for run in loads:
        model, opt, iteration = load_in(config, run, root)
        out.append(train_logged(model, opt, more, first_step=iteration))
    return [{k: v for k, v in logged.items() if k != "pipeline"} for logged in out] if rank == 0 else None
