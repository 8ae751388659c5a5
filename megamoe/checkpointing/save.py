"""Save a training state as a version 2 checkpoint (``format``): each box written once, by one rank.

Collective over the world, in three steps:

1. plan: every rank lists its box views (``box_views``: key, global box, bytes) and all ranks exchange
   the lists (one ``all_gather_object``).  Ranks holding the same box (DP replicas, TP-replicated
   parameters, optimizer state without ZeRO-1) are candidates for one write; every rank runs the
   same greedy assignment (largest box first, to the candidate with the fewest bytes so far), so
   each box is written exactly once and the bytes spread over the ranks.  Rank 0 checks that the
   file system has room for the whole checkpoint before anything is written.
2. write: each rank copies its assigned boxes and its RNG states to CPU, refuses state holding a
   NaN or an infinity, and writes ``shard_RANK.pt`` into ``iter_XXXXXXX.partial/`` (to ``.tmp``,
   fsync, rename), with the CRC-32 of each chunk and of the file (``integrity``).
3. publish (rank 0, once every rank has reported its file complete and flushed, through one
   ``all_gather_object``): ``metadata.json`` with the checksums, rename the directory to
   ``iter_XXXXXXX``, replace the 'latest' marker, delete the ``.partial`` directories that crashed
   saves left, prune (``keep_last``).  A rank whose state is not finite, or whose write failed
   (a full disk), stops the publication: the ``.partial`` directory is removed, the previous
   checkpoint stays the latest, and every rank raises the same one-line ``CheckpointError``.

With ``async_save`` steps 2 and 3 run in a background thread: training continues once the boxes
are copied.  The threads agree over a gloo group of their own, made for the save (no collective
of the training's groups runs outside the main thread); a rank that dies mid-save leaves the
``.partial`` directory unpublished and the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.checkpointing.box_views import BoxView
from megamoe.checkpointing.format import (
    CheckpointError,
    SavedTopology,
    build_metadata,
    chunk_name,
    dtype_name,
    iteration_dir,
    published_iterations,
    read_marker,
    shard_file,
    write_marker,
    write_metadata,
)
from megamoe.checkpointing.integrity import (
    Crc32Writer,
    check_free_space,
    first_nonfinite,
    free_bytes,
    tensor_crc32,
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
    # Boxes with one holder (ZeRO-1 shards, experts of EP = DP) have no choice: place them first,
    # then each replicated box, largest first, on its least loaded holder, to even out the files.
    for ident in sorted(holders, key=lambda i: (len(holders[i]) > 1, -size[i], i)):
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
    """A save that may still be writing (``async_save``).  ``wait()`` returns once it is published,
    and raises, the same ``CheckpointError`` on every rank, when it was not."""

    def __init__(self, target=None, group=None) -> None:
        self.error: BaseException | None = None
        self.thread, self.group = None, group
        if target is not None:
            self.thread = threading.Thread(target=self._run, args=(target,), daemon=True, name="megamoe-save")
            self.thread.start()

    def _run(self, target) -> None:
        try:
            target()
        except BaseException as err:  # handed to the main thread by wait()
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            dist.destroy_process_group(self.group)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _bytes_needed(plans: list[list[tuple]], writer: dict[tuple, int]) -> int:
    """What the checkpoint will take on disk, from above: the chunks' bytes, plus 1 KiB per chunk
    (its zip records, its entry in metadata.json) and 64 KiB per file (RNG states, structure)."""
    sizes = {(key, offsets, sizes): nbytes for plan in plans for key, offsets, sizes, nbytes, *_ in plan}
    return sum(sizes[ident] for ident in writer) + 1024 * len(writer) + 65536 * len(plans)


def _still_latest(root: str) -> str:
    latest = read_marker(root)
    if latest is None:
        return "no checkpoint is published there"
    return f"iteration {latest} stays the latest checkpoint"


def _write(payload: dict, path: str) -> dict:
    """Write this rank's file, flushed to the disk (fsync) before it is renamed into place.
    Returns the rank's report for rank 0: ``{"bytes", "crc32", "chunks": {chunk: crc32}}``, or
    ``{"nonfinite": chunk}`` (nothing written), or ``{"failed": why}``."""
    bad = first_nonfinite(payload["tensors"])
    if bad is not None:
        return {"nonfinite": bad}
    chunks = {name: tensor_crc32(tensor) for name, tensor in payload["tensors"].items()}
    out = None
    try:
        with open(path + ".tmp", "wb") as raw:
            out = Crc32Writer(raw)
            torch.save(payload, out)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:  # torch turns a failed write into a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        cause = out.error if out is not None and out.error is not None else err
        reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0]
        return {"failed": f"writing {path} failed ({reason})"}
    return {"bytes": os.path.getsize(path), "crc32": out.crc32, "chunks": chunks}


def save_sharded(request: SaveRequest, state: ParallelState, *, async_save: bool = False,
                 on_published=None) -> PendingSave:
    """Collective: plan, check the free space, then write and publish (in the background with
    ``async_save``); see the module docstring.  A save that cannot be written raises
    ``CheckpointError`` on every rank (with ``async_save``: from ``wait()``), naming why, with the
    previous checkpoint still the latest and no ``.partial`` directory left.  ``on_published``
    is called on rank 0 once the checkpoint is published."""
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
    needed = _bytes_needed(plans, writer)
    refusal = [None]
    if state.rank == 0:
        short = check_free_space(partial, needed, f"the checkpoint of iteration {request.iteration}")
        if short is not None:
            shutil.rmtree(partial, ignore_errors=True)
            refusal[0] = f"not saving to {request.root}: {short}; {_still_latest(request.root)}"
    dist.broadcast_object_list(refusal, src=0, group=state.world_group)
    if refusal[0] is not None:
        raise CheckpointError(refusal[0])
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

    def publish(reports: list[dict]) -> str | None:
        """Rank 0, once every rank reported: publish, or remove the ``.partial`` directory and
        say why not."""
        unsaved = f"iteration {request.iteration} was not saved to {request.root}"
        for rank, report in enumerate(reports):
            if "nonfinite" in report:
                shutil.rmtree(partial, ignore_errors=True)
                return (f"{unsaved}: {report['nonfinite']} (rank {rank}'s part) holds NaN or infinite values; "
                        f"{_still_latest(request.root)}")
            if "failed" in report:
                shutil.rmtree(partial, ignore_errors=True)
                return (f"{unsaved}: {report['failed']}; it needs {needed:,} bytes, {free_bytes(request.root):,} "
                        f"free now; {_still_latest(request.root)}")
        by_file = {shard_file(rank): report for rank, report in enumerate(reports)}
        for name, report in by_file.items():
            metadata["files"][name] = {"bytes": report["bytes"], "crc32": report["crc32"]}
        for key, entry in metadata["tensors"].items():
            for chunk in entry["chunks"]:
                chunk["crc32"] = by_file[chunk["file"]]["chunks"][chunk_name(key, chunk["offsets"])]
        try:
            write_metadata(partial, metadata)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(partial, final)
            write_marker(request.root, request.iteration)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            return (f"{unsaved}: publishing it failed ({err.strerror or err}); it needs {needed:,} bytes, "
                    f"{free_bytes(request.root):,} free now; {_still_latest(request.root)}")
        _remove_abandoned(request.root)
        if request.keep_last:
            _prune(request.root, request.keep_last)
        return None

    def write_and_publish(group) -> None:
        """Collective over ``group``: every rank writes and reports; rank 0 publishes once all
        reports are in (each file complete and flushed); every rank learns the outcome."""
        reports: list = [None] * state.world_size
        dist.all_gather_object(reports, _write(payload, path), group=group)
        outcome = [publish(reports) if state.rank == 0 else None]
        dist.broadcast_object_list(outcome, src=0, group=group)
        if outcome[0] is not None:
            raise CheckpointError(outcome[0])
        if state.rank == 0 and on_published is not None:
            on_published()

    if not async_save:
        write_and_publish(state.world_group)
        return PendingSave()
    # The background threads agree over a group of their own: no collective of the training's
    # groups may run outside the main thread.
    group = dist.new_group(backend="gloo")
    return PendingSave(lambda: write_and_publish(group), group)


def _remove_abandoned(root: str) -> None:
    """Delete the ``.partial`` directories of saves that crashed: one save runs at a time and this
    one is published, so every ``.partial`` left in ``root`` is abandoned."""
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _prune(root: str, keep_last: int) -> None:
    for old in published_iterations(root)[:-keep_last]:
        shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
