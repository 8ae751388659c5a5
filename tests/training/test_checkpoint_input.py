"""A broken or unusable checkpoint directory is refused at start-up, before any training step,
with a message naming the file (or the path, or both shapes)."""

import json
import os
import re
import shutil

import pytest

import pretrain_moe
from tests.harness import run_distributed
from tests.fixtures import TINY_MOE

BASE = TINY_MOE + ["--train-iters", "2"]


def _refused(argv, match, log):
    from megamoe.checkpointing.format import CheckpointError
    from megamoe.training.arguments import parse_config
    from megamoe.training.trainer import pretrain

    with pytest.raises(CheckpointError, match=match):
        pretrain(parse_config(argv + ["--log-json", log]))
    assert not os.path.exists(log) or not open(log).read().strip(), "a training step ran before the refusal"


def _body(rank, world, tmp):
    os.environ["WORLD_SIZE"] = str(world)
    good, other = os.path.join(tmp, "good"), os.path.join(tmp, "other")
    assert pretrain_moe.main(BASE + ["--save", good]) == 0
    assert pretrain_moe.main(BASE + ["--save", other, "--seed", "8"]) == 0
    log = os.path.join(tmp, "never.jsonl")

    def damaged(name, damage):
        root = os.path.join(tmp, name)
        shutil.copytree(good, root)
        shard = os.path.join(root, "iter_0000002", "shard_00000.pt")
        damage(shard)
        return root, shard

    root, shard = damaged("missing", os.remove)
    _refused(BASE + ["--load", root], re.escape(shard) + " is missing", log)

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    root, shard = damaged("truncated", truncate)
    _refused(BASE + ["--load", root], re.escape(shard) + r" is \d+ bytes but metadata.json recorded \d+", log)

    other_shard = os.path.join(other, "iter_0000002", "shard_00000.pt")
    root, shard = damaged("foreign", lambda path: shutil.copyfile(other_shard, path))
    _refused(BASE + ["--load", root], re.escape(shard) + " (belongs to another checkpoint|is .* bytes)", log)

    wider = [a if a != "32" else "64" for a in BASE]  # --hidden-size 64
    _refused(wider + ["--load", good], r"holds a different model \(hidden_size: saved 32 vs now 64\)", log)

    blocker = os.path.join(tmp, "a_file")
    open(blocker, "w").close()
    unwritable = os.path.join(blocker, "ckpt")
    _refused(BASE + ["--save", unwritable], re.escape(unwritable) + " cannot be written", log)

    legacy = os.path.join(tmp, "legacy")
    os.makedirs(os.path.join(legacy, "iter_0000002"))
    with open(os.path.join(legacy, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    with open(os.path.join(legacy, "iter_0000002", "metadata.json"), "w") as f:
        json.dump({"format": "megamoe", "version": 1}, f)
    _refused(BASE + ["--load", legacy],
             re.escape(f"python tools/convert_checkpoint.py --load-dir {legacy} --save-dir NEW_DIR"), log)


def test_broken_checkpoints_are_refused_before_training(tmp_path):
    run_distributed(_body, 1, str(tmp_path), timeout=300)
