"""Save a training state as a version 2 checkpoint (``format``): each box written once, by one rank.

Collective over the world, in three steps:

1. plan: every rank lists its box views (``box_views``: key, global box, bytes) and all ranks exchange
   the lists (one ``all_gather_object``).  Ranks holding the same box (DP replicas, TP-replicated
   parameters, optimizer state without ZeRO-1) are candidates for one write; every rank runs the
   same greedy assignment (largest box first, to the candidate with the fewest bytes so far), so
   each box is written exactly once and the bytes spread over the ranks.
2. write: each rank copies its assigned boxes and its RNG states to CPU and writes
   ``shard_RANK.pt`` into ``iter_XXXXXXX.partial/`` (write to ``.tmp``, then rename).
3. publish (rank 0, once every rank's file is there): ``metadata.json``, rename the directory to
   ``iter_XXXXXXX``, replace the 'latest' marker, delete the ``.partial`` directories that
   crashed saves left, prune (``keep_last``).

With ``async_save`` steps 2 and 3 run in a background thread: training continues once the boxes
are copied.  Rank 0's thread publishes only after every rank's file exists, by polling the
directory (no collective outside the main thread); a rank that dies mid-save leaves the
``.partial`` directory unpublished and the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.checkpointing.box_views import BoxView
from megamoe.checkpointing.format import (
    SavedTopology,
    build_metadata,
    chunk_name,
    dtype_name,
    iteration_dir,
    published_iterations,
    shard_file,
    write_marker,
    write_metadata,
)
from megamoe.parallel.state import ParallelState


@dataclass(frozen=True)
class SaveRequest:
    """What one rank saves; equal on every rank except ``views`` and ``rng``."""

    root: str
    iteration: int
    consumed_samples: int
    topology: SavedTopology
    model_config: dict  # format.model_config_dict form
    args: dict
    optimizer: dict | None  # the optimizer's scalars, None without optimizer state
    params: dict  # {name: ParamSpec.to_entry()}
    views: list[BoxView]
    rng: dict | None
    lr_schedule: dict | None = None  # the run's LRSchedule.curve()
    keep_last: int = 0


def _assign(plans: list[list[tuple]]) -> dict[tuple, int]:
    """``{(key, offsets, sizes): writing rank}`` from every rank's ``(key, offsets, sizes, bytes, ...)``."""
    holders: dict[tuple, list[int]] = {}
    size: dict[tuple, int] = {}
    for rank, plan in enumerate(plans):
        for key, offsets, sizes, nbytes, *_ in plan:
            ident = (key, offsets, sizes)
            holders.setdefault(ident, []).append(rank)
            size[ident] = nbytes
    load = [0] * len(plans)
    writer = {}
    for ident in sorted(holders, key=lambda i: (-size[i], i)):
        rank = min(holders[ident], key=lambda r: (load[r], r))
        writer[ident] = rank
        load[rank] += size[ident]
    return writer


def _tensors_entry(plans: list[list[tuple]], writer: dict[tuple, int]) -> dict:
    """``metadata.json``'s ``tensors``: every key's global shape, dtype and chunks (file, box)."""
    shapes = {key: (shape, dtype) for plan in plans for key, _, _, _, shape, dtype in plan}
    tensors: dict[str, dict] = {}
    for (key, offsets, sizes), rank in sorted(writer.items()):
        shape, dtype = shapes[key]
        entry = tensors.setdefault(key, {"shape": list(shape), "dtype": dtype, "chunks": []})
        entry["chunks"].append({"file": shard_file(rank), "offsets": list(offsets), "sizes": list(sizes)})
    for key, entry in tensors.items():
        covered = sum(torch.Size(c["sizes"]).numel() for c in entry["chunks"])
        assert covered == torch.Size(entry["shape"]).numel(), f"{key}: chunks cover {covered} of {entry['shape']}"
    return tensors


class PendingSave:
    """A save whose files may still be written; ``wait()`` returns once this rank's part is done
    (on rank 0: once the checkpoint is published) and re-raises an error of the writer."""

    def __init__(self, target, background: bool) -> None:
        self.error: BaseException | None = None
        self.thread = None
        if background:
            self.thread = threading.Thread(target=self._run, args=(target,), daemon=True, name="megamoe-save")
            self.thread.start()
        else:
            target()

    def _run(self, target) -> None:
        try:
            target()
        except BaseException as err:  # handed to the main thread by wait()
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def save_sharded(request: SaveRequest, state: ParallelState, *, async_save: bool = False) -> PendingSave:
    """Collective: plan, then write (in the background with ``async_save``); see the module docstring."""
    final = iteration_dir(request.root, request.iteration)
    partial = final + ".partial"
    if state.rank == 0:
        os.makedirs(request.root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    plan = [(p.key, tuple(p.box.offsets), tuple(p.box.sizes), p.tensor.numel() * p.tensor.element_size(),
             tuple(p.shape), dtype_name(p.tensor.dtype)) for p in request.views]
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, (plan, uuid.uuid4().hex), group=state.world_group)
    plans = [g[0] for g in gathered]
    checkpoint_id = gathered[0][1]
    writer = _assign(plans)
    mine = {}
    for view in request.views:
        ident = (view.key, tuple(view.box.offsets), tuple(view.box.sizes))
        if writer[ident] == state.rank:
            # A compact CPU copy: a view would save its whole storage, and training goes on changing it.
            mine[chunk_name(view.key, view.box.offsets)] = torch.empty(
                view.box.sizes, dtype=view.tensor.dtype, device="cpu").copy_(view.tensor)
    payload = {"checkpoint": checkpoint_id, "rank": state.rank, "tensors": mine}
    if request.rng is not None:
        payload["rng"] = request.rng
    path = os.path.join(partial, shard_file(state.rank))
    metadata = None
    if state.rank == 0:
        metadata = build_metadata(
            checkpoint_id=checkpoint_id,
            iteration=request.iteration,
            consumed_samples=request.consumed_samples,
            topology=request.topology,
            model_config=request.model_config,
            args=request.args,
            optimizer=request.optimizer,
            params=request.params,
            tensors=_tensors_entry(plans, writer),
            files={shard_file(r): {} for r in range(state.world_size)},
            rng={str(r): shard_file(r) for r in range(state.world_size)} if request.rng is not None else {},
            lr_schedule=request.lr_schedule,
        )

    def write() -> None:
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)

    def publish() -> None:
        for name in metadata["files"]:
            metadata["files"][name] = {"bytes": os.path.getsize(os.path.join(partial, name))}
        write_metadata(partial, metadata)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        write_marker(request.root, request.iteration)
        _remove_abandoned(request.root)
        if request.keep_last:
            _prune(request.root, request.keep_last)

    if not async_save:
        pending = PendingSave(write, background=False)
        dist.barrier(group=state.world_group)
        if state.rank == 0:
            publish()
        dist.barrier(group=state.world_group)
        return pending

    def write_then_publish() -> None:
        write()
        if state.rank == 0:
            files = [os.path.join(partial, name) for name in metadata["files"]]
            while not all(os.path.exists(f) for f in files):
                time.sleep(0.05)
            publish()

    return PendingSave(write_then_publish, background=True)


def _remove_abandoned(root: str) -> None:
    """Delete the ``.partial`` directories of saves that crashed: one save runs at a time and this
    one is published, so every ``.partial`` left in ``root`` is abandoned."""
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _prune(root: str, keep_last: int) -> None:
    for old in published_iterations(root)[:-keep_last]:
        shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
