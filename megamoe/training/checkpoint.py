"""Saving and loading a training run's checkpoint: what the trainer hands to the format.

The format and its engine live in ``megamoe.checkpointing`` (``format``: paths, metadata,
files; ``save``: each box written once, optionally in the background; ``load``: any layout
reads any checkpoint).  This module gathers the run's state (model, optimizer shards, RNG
states, position) for a save and puts it back on load.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megamoe.checkpointing.box_views import model_views, optimizer_views, placements
from megamoe.checkpointing.format import (
    CheckpointError,
    SavedTopology,
    ShardFiles,
    checkpoint_dir,
    iteration_dir,
    load_metadata,
    model_config_dict,
    published_iterations,
)
from megamoe.checkpointing.load import load_model, optimizer_state, rng_states
from megamoe.checkpointing.param_specs import model_specs
from megamoe.checkpointing.save import PendingSave, SaveRequest, save_sharded
from megamoe.optim.state_dict import OPTIMIZER_SCALARS
from megamoe.parallel.random import RNGStatesTracker
from megamoe.parallel.state import ParallelState
from megamoe.training.save_lock import LOCK_FILE, SaveLock

__all__ = ["CheckpointError", "Loaded", "check_same_model", "claim_save_dir", "open_checkpoint", "run_topology",
           "save_checkpoint"]


def run_topology(state: ParallelState, use_distributed_optimizer: bool) -> SavedTopology:
    """The topology of ``state``'s run, as its checkpoints record it."""
    return SavedTopology(
        world_size=state.world_size,
        tensor_model_parallel_size=state.tp_size,
        expert_model_parallel_size=state.moe_ep_sizes,
        use_distributed_optimizer=bool(use_distributed_optimizer),
        expert_tensor_parallel_size=state.etp_size,
        sequence_parallel=state.sequence_parallel,
        pipeline_model_parallel_size=state.pp_size,
    )


def _rng_state(tracker: RNGStatesTracker) -> dict:
    state = {
        "python": random.getstate(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": tracker.get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, tracker: RNGStatesTracker) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    tracker.set_states(state["tracker"])


def save_checkpoint(
    root: str,
    *,
    iteration: int,
    consumed_samples: int,
    model: torch.nn.Module,
    optimizer,
    model_config,
    layout: ParallelState,
    use_distributed_optimizer: bool,
    args: dict,
    lr_schedule: dict | None = None,
    keep_last: int = 0,
    async_save: bool = False,
    on_published=None,
    save_optimizer: bool = True,
) -> PendingSave:
    """Collective over the world: save into ``root/iter_XXXXXXX``.  Without ``async_save`` the
    checkpoint is published when this returns; with it, call ``wait()`` on the result before
    the next save and before exiting.  ``lr_schedule``: the run's ``LRSchedule.curve()``;
    ``on_published``: called on rank 0 once the checkpoint is published.  A checkpoint that
    cannot be saved (state not finite, disk full) raises ``CheckpointError`` on every rank, with
    ``async_save`` from ``wait()``; the previous one stays the latest.  Without ``save_optimizer``
    (--no-save-optim) it holds the weights only, as an imported one does."""
    state = layout
    where = placements(model, state)
    optim = optimizer.state_dict()
    # The whole model's specs, whichever pipeline stage this rank holds.
    specs = {name: spec.to_entry() for name, spec in model_specs(model_config, model.execution.params_dtype).items()}
    request = SaveRequest(
        root=root,
        iteration=iteration,
        consumed_samples=consumed_samples,
        topology=run_topology(state, use_distributed_optimizer),
        model_config=model_config_dict(model_config),
        args=args,
        optimizer={key: optim[key] for key in OPTIMIZER_SCALARS} if save_optimizer else None,
        lr_schedule=lr_schedule,
        params=specs,
        views=model_views(model, where) + (optimizer_views(optim["shards"], where) if save_optimizer else []),
        rng=_rng_state(state.rng),
        keep_last=keep_last,
    )
    return save_sharded(request, state, async_save=async_save, on_published=on_published)


def check_same_model(directory: str, metadata: dict, model_config) -> None:
    """Refuse a checkpoint of another model, naming each differing field with both values.  The
    parallel layout may differ: loading reshards."""
    saved_model = metadata["model_config"]
    current_model = model_config_dict(model_config)
    # A field a checkpoint predates has its default (the value the model had before the field existed).
    defaults = model_config_dict(type(model_config)(vocab_size=model_config.vocab_size))
    saved_model = {**defaults, **saved_model}
    differ = [k for k in current_model if saved_model.get(k) != current_model[k]]
    if differ:
        details = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {current_model[k]!r}" for k in differ)
        raise CheckpointError(f"{directory} holds a different model ({details})")


class Loaded:
    """A checkpoint opened and checked (files, checksums, model) for this run; nothing applied yet."""

    def __init__(self, directory: str, metadata: dict, files: ShardFiles, layout: ParallelState) -> None:
        self.directory, self.metadata, self.files = directory, metadata, files
        self.state = layout
        self.iteration = int(metadata["iteration"])
        self.consumed_samples = int(metadata["consumed_samples"])
        self.saved_topology = SavedTopology.from_metadata(metadata["layout"])
        self.has_optimizer = metadata["optimizer"] is not None
        self.lr_schedule = metadata.get("lr_schedule")  # LRSchedule.curve() of the run that saved it

    def load_model(self, model: torch.nn.Module) -> None:
        load_model(self.files, model, self.state)

    def load_optimizer(self, optimizer, model: torch.nn.Module) -> None:
        optimizer.load_state_dict(optimizer_state(self.files, optimizer, model, self.state))

    def restore_rng(self) -> bool:
        """Restore this rank's RNG states; False if the checkpoint has none."""
        states = rng_states(self.files, self.state, int(self.metadata["args"].get("seed", 0)))
        if states is None:
            return False
        _set_rng_state(states, self.state.rng)
        return True


def open_checkpoint(root: str, model_config, layout: ParallelState) -> Loaded | None:
    """Collective over ``layout``'s world: the checkpoint ``root`` names, checked for loading into
    ``layout``'s rank, or None if there is none.  A damaged one (its metadata.json, or any byte of its files: ``integrity``) is refused
    on every rank, naming the file and the tensor, and the newest intact checkpoint beside it to
    ``--load`` instead."""
    directory = checkpoint_dir(root)
    if directory is None:
        return None
    state = layout
    metadata = _or_newest_intact(directory, state, lambda: load_metadata(directory))
    check_same_model(directory, metadata, model_config)
    files = _or_newest_intact(directory, state, lambda: _verified_files(directory, metadata, state))
    return Loaded(directory, metadata, files, layout)


def _verified_files(directory: str, metadata: dict, state) -> ShardFiles:
    """Collective: ``directory``'s files, opened and checked against their checksums, each file
    read by one rank; the first damage found is raised on every rank."""
    files = ShardFiles(directory, metadata)
    names = sorted(metadata["files"])
    problems: list = [None] * state.world_size
    dist.all_gather_object(problems, files.verify(names[state.rank::state.world_size]), group=state.world_group)
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return files


def _or_newest_intact(directory: str, state, opening):
    """``opening()``; a ``CheckpointError`` it raises gains what to load instead."""
    try:
        return opening()
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {_newest_intact(directory, state)}") from None


def _newest_intact(directory: str, state) -> str:
    """Collective: the newest checkpoint beside the unusable ``directory`` that opens and
    verifies, as a suggestion (verification reads each candidate whole, on this error path only)."""
    root = os.path.dirname(os.path.normpath(directory))
    for iteration in reversed(published_iterations(root)):
        candidate = iteration_dir(root, iteration)
        if os.path.abspath(candidate) == os.path.abspath(directory):
            continue
        try:
            _verified_files(candidate, load_metadata(candidate), state)
        except CheckpointError:
            continue
        return f"the newest intact checkpoint is {candidate}: --load {candidate} instead"
    return f"no other intact checkpoint is in {root}"


def _check_save_dir(root: str) -> None:
    """Refuse, naming the path, a --save directory that cannot be created or written (at start-up,
    not at the first save)."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"--save {root} cannot be written ({err.strerror or err})") from None


@contextlib.contextmanager
def claim_save_dir(root: str, layout: ParallelState, log) -> Iterator[None]:
    """Collective over ``layout``'s world, for the whole run: ``_check_save_dir`` on every rank,
    then rank 0 holds ``root``'s run lock (``save_lock``) until the block ends.  A directory
    another run holds is refused on every rank, before any work, naming that run."""
    _check_save_dir(root)
    state = layout
    lock = SaveLock(root) if state.rank == 0 else None
    outcome = [lock.acquire() if lock is not None else None]
    dist.broadcast_object_list(outcome, src=0, group=state.world_group)
    acquired, text = outcome[0]
    if not acquired:
        raise CheckpointError(f"--save {root} is in use by another run ({text}; lock file "
                              f"{os.path.join(root, LOCK_FILE)}): wait for it to end, or give another --save")
    if text:
        log.info(text)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
