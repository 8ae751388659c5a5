"""A broken source or an impossible request stops the conversion with a message that names the
file or the numbers, and leaves no target behind."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import load_metadata, write_metadata
from megamoe.checkpointing.integrity import file_crc32
from tests.fixtures import REPO

TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained checkpoint (save root) to damage."""
    root = str(tmp_path / "src")
    shutil.copytree(trained.root, root)
    return root


def _shard(root: str, rank: int) -> str:
    (directory,) = glob.glob(os.path.join(root, "iter_*"))
    return os.path.join(directory, f"shard_{rank:05d}.pt")


def _resave(path: str, payload: dict) -> None:
    """Write a changed shard file and record its new size and checksum, as a file of the
    checkpoint would be."""
    torch.save(payload, path)
    directory = os.path.dirname(path)
    metadata = load_metadata(directory)
    metadata["files"][os.path.basename(path)].update(bytes=os.path.getsize(path), crc32=file_crc32(path))
    write_metadata(directory, metadata)


def _refused(root: str, tmp_path, match: str, **flags):
    target = str(tmp_path / "dst")
    with pytest.raises(ValueError, match=match):
        convert(root, target, progress=None, **flags)
    assert not os.path.exists(target)
    assert not glob.glob(target + ".tmp-*"), "a refused conversion left its temporary directory"


def test_missing_shard_is_named(copy, tmp_path):
    path = _shard(copy, 1)
    os.remove(path)
    _refused(copy, tmp_path, re.escape(path) + " is missing")


def test_truncated_shard_is_named(copy, tmp_path):
    path = _shard(copy, 2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _refused(copy, tmp_path, re.escape(path) + r" is \d+ bytes but metadata.json recorded \d+: it is truncated")


def test_unlisted_shard_is_named(copy, tmp_path):
    extra = _shard(copy, 4)
    shutil.copyfile(_shard(copy, 0), extra)
    _refused(copy, tmp_path, re.escape(extra) + " is not listed in metadata.json")


def test_shard_of_another_checkpoint_is_named(copy, tmp_path):
    path = _shard(copy, 2)
    payload = torch.load(path, weights_only=True)
    payload["checkpoint"] = "0" * 32  # another save's id
    _resave(path, payload)
    _refused(copy, tmp_path, re.escape(path) + " belongs to another checkpoint")


def test_unknown_tensor_is_refused_not_dropped(copy, tmp_path):
    path = _shard(copy, 3)
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["model/layers.0.mlp.bias@0"] = torch.zeros(4)
    _resave(path, payload)
    _refused(copy, tmp_path, re.escape(path) + r": 1 tensors were not converted .*model/layers.0.mlp.bias@0")


def test_damaged_shard_is_refused_naming_the_tensor(copy, tmp_path):
    path = _shard(copy, 1)
    payload = torch.load(path, weights_only=True)
    key, tensor = next((k, t) for k, t in payload["tensors"].items() if k.startswith("model/") and t.numel() >= 4)
    data = open(path, "rb").read()
    with open(path, "r+b") as f:  # the file keeps its size
        f.seek(data.find(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()))
        f.write(b"\xa5" * 8)
    _refused(copy, tmp_path, re.escape(f"{path} is damaged: tensor {key.split('@')[0]} (chunk at offsets "))


def test_not_a_megamoe_checkpoint(tmp_path):
    source = tmp_path / "notes"
    source.mkdir()
    (source / "readme.txt").write_text("hello")
    _refused(str(source), tmp_path, "is not a megamoe checkpoint")


def test_unknown_version_is_refused(copy, tmp_path):
    (directory,) = glob.glob(os.path.join(copy, "iter_*"))
    meta_path = os.path.join(directory, "metadata.json")
    metadata = json.load(open(meta_path))
    metadata["version"] = 99
    json.dump(metadata, open(meta_path, "w"))
    _refused(copy, tmp_path, "version 99 is not supported")


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(target_tensor_parallel_size=3), r"--target-tensor-parallel-size 3 does not divide --target-world-size 4"),
        (
            dict(target_tensor_parallel_size=3, target_world_size=6),
            "--num-attention-heads 4 is not divisible by --target-tensor-parallel-size 3",
        ),
        (dict(target_expert_parallel_size=(3,)), "--num-experts 4 .* not divisible by --target-expert-parallel-size 3"),
        (
            dict(target_world_size=6, target_tensor_parallel_size=2, target_expert_parallel_size=(2,)),
            "--target-expert-parallel-size 2 does not divide the data-parallel size 3",
        ),
        (
            dict(target_expert_parallel_size=(1, 2, 4)),
            r"--target-expert-parallel-size got 3 values \[1, 2, 4\]; give one value or one per MoE layer",
        ),
    ],
    ids=["tp-3-world-4", "tp-3-heads-4", "ep-3", "ep-2-dp-3", "three-eps-two-layers"],
)
def test_layout_that_does_not_divide_the_model_names_the_numbers(trained, tmp_path, flags, match):
    _refused(trained.root, tmp_path, "does not fit the model: " + match, **flags)


def test_existing_target_needs_force(trained, tmp_path):
    target = tmp_path / "dst"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass --force"):
        convert(trained.root, str(target), to="consolidated", progress=None)
    assert (target / "keep.txt").read_text() == "mine"
    convert(trained.root, str(target), to="consolidated", force=True, progress=None)
    assert not (target / "keep.txt").exists() and (target / "metadata.json").exists()


def test_command_line(trained, tmp_path):
    target = str(tmp_path / "dst")
    ok = subprocess.run(
        [sys.executable, TOOL, "--load-dir", trained.root, "--save-dir", target, "--target-tensor-parallel-size", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[3/5] layers.1" in ok.stderr  # progress, one line per group
    assert re.search(r"full state converted: 68 tensors, .* checksum ([0-9a-f]{16})", ok.stdout)
    checksums = re.findall(r"checksum ([0-9a-f]{16})", ok.stdout)
    assert len(checksums) == 2 and checksums[0] == checksums[1], ok.stdout
    again = subprocess.run(
        [sys.executable, TOOL, "--load-dir", trained.root, "--save-dir", target, "--to", "consolidated"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"convert_checkpoint.py: error: --save-dir {target} exists and is not empty; pass --force to replace it"
    ]
