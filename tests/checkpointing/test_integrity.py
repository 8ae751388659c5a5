"""Nothing damaged is loaded and nothing broken is published (``megamoe.checkpointing.integrity``):

* a byte changed anywhere in a shard or in metadata.json (the file's size unchanged) is refused on
  load, naming the file, the tensor, and the newest intact checkpoint to --load instead;
* a checkpoint whose state holds a NaN, or whose write fails (a real write error: the writing
  rank's file-size limit, RLIMIT_FSIZE, set below its shard), is not published: the previous one
  stays the latest, no ``.partial`` directory is left, every rank raises the same one line;
* the free space is checked, with the file system's real statvfs numbers, before anything is written;
* with ``--async-save`` the 'latest' marker moves only once every rank's file is written and
  flushed, even when one rank's write is slow.
"""

import glob
import json
import os
import re
import resource
import signal
import time

import pytest
import torch

from megamoe.checkpointing.format import CheckpointError, iteration_dir, read_marker
from megamoe.checkpointing.integrity import check_free_space, free_bytes
from tests.harness import run_distributed
from tests.tiny_moe import SEED, build_model, build_optimizer, forward_backward, tiny_config

WORLD = 2


def _trained(steps_saved=(1, 2), root=None, zero=True):
    """The tiny MoE on WORLD ranks with ZeRO-1 (each rank writes its own optimizer ranges), one
    step before each save in ``steps_saved``; returns ``(config, model, opt)``."""
    from megamoe.training import checkpoint as ckpt

    config = tiny_config(vocab_size=300)
    model = build_model(config, 1)
    opt = build_optimizer(model, zero=zero)
    for step in range(max(steps_saved, default=0)):
        forward_backward(model, opt, step)
        assert not opt.step().skipped
        if step + 1 in steps_saved:
            _save(ckpt, root, step + 1, model, opt, config, zero)
    return config, model, opt


def _save(ckpt, root, iteration, model, opt, config, zero=True, **options):
    return ckpt.save_checkpoint(root, iteration=iteration, consumed_samples=iteration, model=model, optimizer=opt,
                                model_config=config, layout=model.layout, use_distributed_optimizer=zero,
                                args={"seed": SEED}, **options)


def _save_two(rank, world, root):
    _trained((1, 2), root)


def _open(rank, world, root):
    """The refusal ``open_checkpoint`` raises (the same line on every rank), or None."""
    from megamoe.training import checkpoint as ckpt

    config = tiny_config(vocab_size=300)
    model = build_model(config, 1)
    try:
        ckpt.open_checkpoint(root, config, model.layout)
    except CheckpointError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save root with iterations 1 and 2 (the latest), written by WORLD ranks."""
    root = str(tmp_path_factory.mktemp("integrity") / "ckpt")
    run_distributed(_save_two, WORLD, root, timeout=300)
    return root


def _copy(saved, tmp_path) -> str:
    import shutil

    root = str(tmp_path / "ckpt")
    shutil.copytree(saved, root)
    return root


def _overwrite(path: str, at: int, data: bytes) -> None:
    """Overwrite bytes in place: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _refusals(root):
    refusals = run_distributed(_open, WORLD, root, timeout=300)
    assert refusals[0] is not None and len(set(refusals)) == 1, refusals
    return refusals[0]


def test_a_damaged_tensor_is_refused_naming_file_tensor_and_the_newest_intact_checkpoint(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shard, key = next((path, key) for path in sorted(glob.glob(os.path.join(iteration_dir(root, 2), "shard_*.pt")))
                      for key in torch.load(path, weights_only=True)["tensors"] if key.startswith("optim/exp_avg_sq/"))
    payload = torch.load(shard, weights_only=True)
    data = open(shard, "rb").read()
    at = data.find(payload["tensors"][key].reshape(-1).view(torch.uint8).numpy().tobytes())
    assert at > 0
    _overwrite(shard, at, os.urandom(8))  # random bytes in the Adam moment: silently loaded before
    tensor = key.split("@")[0]
    older = iteration_dir(root, 1)
    assert re.fullmatch(
        re.escape(f"{shard} is damaged: tensor {tensor} (chunk at offsets ") + r"\[[\d, ]+\]"
        + re.escape(f") does not match its checksum in metadata.json; the newest intact checkpoint is {older}: "
                    f"--load {older} instead"), _refusals(root))
    # With the older one damaged too, nothing intact is left to suggest.
    _overwrite(os.path.join(older, "shard_00000.pt"), 4096, b"\0" * 4096)
    assert _refusals(root).endswith(f"; no other intact checkpoint is in {root}")


def test_damaged_bytes_outside_every_tensor_are_refused(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shard = os.path.join(iteration_dir(root, 2), "shard_00000.pt")
    at = open(shard, "rb").read().find(b"torch_cpu")  # inside the pickled RNG states' names
    _overwrite(shard, at, b"TORCH")
    message = _refusals(root)
    assert message.startswith(shard), message  # unreadable, or its RNG states / structure damaged
    assert message.endswith(f"the newest intact checkpoint is {iteration_dir(root, 1)}: --load "
                            f"{iteration_dir(root, 1)} instead")


def test_a_damaged_metadata_json_is_refused_in_one_line(saved, tmp_path):
    root = _copy(saved, tmp_path)
    meta = os.path.join(iteration_dir(root, 2), "metadata.json")
    _overwrite(meta, 100, os.urandom(64) + b"\xff\xfe")  # not UTF-8: a UnicodeDecodeError traceback before
    assert re.fullmatch(re.escape(f"{meta} is damaged: it is not valid UTF-8 JSON (") + r".+" + re.escape(
        f"); the newest intact checkpoint is {iteration_dir(root, 1)}: --load {iteration_dir(root, 1)} instead"),
        _refusals(root))
    root = _copy(saved, tmp_path / "valid")
    meta = os.path.join(iteration_dir(root, 2), "metadata.json")
    text = open(meta).read()
    assert '"consumed_samples": 2' in text
    with open(meta, "w") as f:  # still valid JSON, one value changed
        f.write(text.replace('"consumed_samples": 2', '"consumed_samples": 3'))
    assert _refusals(root).startswith(f"{meta} is damaged: its contents do not match the checksum stored in it; ")


def _poison_and_save(rank, world, root, async_save):
    """Iteration 1 saved; then a NaN in rank 1's own Adam moment, and the save of iteration 2."""
    from megamoe.training import checkpoint as ckpt

    config, model, opt = _trained((1,), root)
    forward_backward(model, opt, 1)
    opt.step()
    if rank == 1:
        opt.adam_state(opt.pieces[0])["exp_avg_sq"][0] = float("nan")
    with pytest.raises(CheckpointError) as refusal:
        _save(ckpt, root, 2, model, opt, config, async_save=async_save).wait()
    return str(refusal.value)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_state_with_a_nan_is_not_published(tmp_path, async_save):
    root = str(tmp_path / "ckpt")
    messages = run_distributed(_poison_and_save, WORLD, root, async_save, timeout=300)
    assert len(set(messages)) == 1, messages
    assert re.fullmatch(re.escape(f"iteration 2 was not saved to {root}: optim/exp_avg_sq/")
                        + r"\S+ \(rank 1's part\) holds NaN or infinite values; iteration 1 stays the latest checkpoint",
                        messages[0]), messages[0]
    assert read_marker(root) == 1
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def _write_fails_on_rank_1(rank, world, root, async_save):
    """Iteration 1 saved; then rank 1 may write files of at most half its shard (RLIMIT_FSIZE: the
    kernel fails the write, EFBIG), and iteration 2 is saved."""
    from megamoe.training import checkpoint as ckpt

    config, model, opt = _trained((1,), root)
    forward_backward(model, opt, 1)
    opt.step()
    limit = os.path.getsize(os.path.join(iteration_dir(root, 1), "shard_00001.pt")) // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointError) as refusal:
            _save(ckpt, root, 2, model, opt, config, async_save=async_save).wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)
    return str(refusal.value)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_names_path_and_bytes(tmp_path, async_save):
    root = str(tmp_path / "ckpt")
    messages = run_distributed(_write_fails_on_rank_1, WORLD, root, async_save, timeout=300)
    assert len(set(messages)) == 1, messages
    shard = os.path.join(root, "iter_0000002.partial", "shard_00001.pt")
    assert re.fullmatch(re.escape(f"iteration 2 was not saved to {root}: writing {shard} failed (")
                        + r"[^)]*File too large[^)]*\); it needs [\d,]+ bytes, [\d,]+ free now; "
                        r"iteration 1 stays the latest checkpoint", messages[0]), messages[0]
    assert read_marker(root) == 1
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_free_space_is_checked_against_the_file_systems_real_numbers(tmp_path):
    free = free_bytes(str(tmp_path))
    assert check_free_space(str(tmp_path), 1, "a byte") is None
    message = check_free_space(str(tmp_path), free + 2**40, "the checkpoint of iteration 7")
    assert re.fullmatch(re.escape(f"the checkpoint of iteration 7 needs {free + 2**40:,} bytes but the file system "
                                  f"of {tmp_path} has ") + r"[\d,]+ free", message), message


def _larger_than_the_disk(rank, world, root):
    """Iteration 1 saved; iteration 2 is made to need 1 TiB more than the real free space."""
    from megamoe.checkpointing import save
    from megamoe.training import checkpoint as ckpt

    config, model, opt = _trained((1,), root)
    bytes_needed = save._bytes_needed
    save._bytes_needed = lambda plans, writer: free_bytes(root) + 2**40
    try:
        with pytest.raises(CheckpointError) as refusal:
            _save(ckpt, root, 2, model, opt, config)
    finally:
        save._bytes_needed = bytes_needed
    return str(refusal.value)


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path):
    root = str(tmp_path / "ckpt")
    messages = run_distributed(_larger_than_the_disk, WORLD, root, timeout=300)
    assert len(set(messages)) == 1
    assert re.fullmatch(re.escape(f"not saving to {root}: the checkpoint of iteration 2 needs ") + r"[\d,]+ bytes but "
                        + re.escape(f"the file system of {os.path.abspath(root)}/iter_0000002.partial has ")
                        + r"[\d,]+ free; iteration 1 stays the latest checkpoint", messages[0]), messages[0]
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def _slow_rank_1(rank, world, root):
    """An async save whose rank 1 writes its file 1 s late; returns when rank 1's file was
    complete, and when the marker was written and the publication reported (rank 0)."""
    from megamoe.training import checkpoint as ckpt

    config, model, opt = _trained((), root)
    forward_backward(model, opt, 0)
    opt.step()
    written, published = [], []
    real_save = torch.save

    def late_save(obj, f, *args, **kwargs):
        time.sleep(1.0)
        real_save(obj, f, *args, **kwargs)
        written.append(time.time_ns())

    if rank == 1:
        torch.save = late_save
    try:
        pending = _save(ckpt, root, 1, model, opt, config, async_save=True,
                        on_published=lambda: published.append(time.time_ns()))
        pending.wait()
    finally:
        torch.save = real_save
    marker = os.path.join(root, "latest_checkpointed_iteration.txt")
    return {"written": written, "published": published, "marker": os.stat(marker).st_mtime_ns if rank == 0 else None}


def test_async_save_publishes_only_after_every_rank_wrote_and_flushed(tmp_path):
    root = str(tmp_path / "ckpt")
    rank0, rank1 = run_distributed(_slow_rank_1, WORLD, root, timeout=300)
    (written,) = rank1["written"]
    (published,) = rank0["published"]
    assert rank0["marker"] >= written and published >= written
    assert _refusals_or_none(root) is None  # complete, and every checksum matches


def _refusals_or_none(root):
    refusals = run_distributed(_open, WORLD, root, timeout=300)
    assert len(set(refusals)) == 1
    return refusals[0]


def test_metadata_records_every_chunks_and_files_checksum(saved):
    metadata = json.load(open(os.path.join(iteration_dir(saved, 2), "metadata.json")))
    assert all(isinstance(entry["crc32"], int) for entry in metadata["files"].values())
    assert all(isinstance(chunk["crc32"], int) for entry in metadata["tensors"].values() for chunk in entry["chunks"])
    assert isinstance(metadata["metadata_crc32"], int)
