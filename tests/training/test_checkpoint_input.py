"""A broken or unusable checkpoint directory is refused at start-up, before any training step,
with a message naming the file (or the path, or both shapes)."""

import json
import os
import re
import shutil

import pytest

import pretrain_moe
from tests.harness import run_distributed
from tests.fixtures import TINY_MOE, read_json_log

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

    def overwrite(path):  # 4 KiB of zeros in the middle, the size unchanged: loaded silently before
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\0" * 4096)

    root, shard = damaged("overwritten", overwrite)
    _refused(BASE + ["--load", root], re.escape(shard) + " is damaged: .*; no other intact checkpoint is in "
             + re.escape(root), log)
    root = os.path.join(tmp, "meta")
    shutil.copytree(good, root)
    meta = os.path.join(root, "iter_0000002", "metadata.json")
    overwrite(meta)
    _refused(BASE + ["--load", root], re.escape(meta) + " is damaged: it is not valid UTF-8 JSON", log)

    other_shard = os.path.join(other, "iter_0000002", "shard_00000.pt")
    root, shard = damaged("foreign", lambda path: shutil.copyfile(other_shard, path))
    _refused(BASE + ["--load", root], re.escape(shard) + " (belongs to another checkpoint|is .* bytes)", log)

    wider = BASE + ["--hidden-size", "64"]
    _refused(wider + ["--load", good], r"holds a different model \(hidden_size: saved 32 vs now 64\)", log)

    blocker = os.path.join(tmp, "a_file")
    open(blocker, "w").close()
    unwritable = os.path.join(blocker, "ckpt")
    _refused(BASE + ["--save", unwritable], re.escape(unwritable) + " cannot be written", log)

    unmarked = os.path.join(tmp, "unmarked")
    shutil.copytree(good, unmarked)
    os.remove(os.path.join(unmarked, "latest_checkpointed_iteration.txt"))
    _refused(BASE + ["--load", unmarked], re.escape(unmarked) + r" holds checkpoint directories \(iter_0000002\) but no "
             "latest_checkpointed_iteration.txt", log)

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


def _resume_body(rank, world, tmp):
    os.environ["WORLD_SIZE"] = str(world)
    save = os.path.join(tmp, "ckpt")
    assert pretrain_moe.main(BASE + ["--save", save, "--save-interval", "1"]) == 0
    # One more iteration on the saved schedule (--train-iters 2 decayed over 2 iterations).
    more = TINY_MOE + ["--train-iters", "3", "--lr-decay-iters", "2"]
    for name, load in (("root", save), ("dir", os.path.join(save, "iter_0000002"))):
        argv = more + ["--load", load, "--log-json", os.path.join(tmp, f"{name}.jsonl")]
        assert pretrain_moe.main(argv) == 0
    old = more + ["--load", os.path.join(save, "iter_0000001"),
                      "--log-json", os.path.join(tmp, "old.jsonl")]
    assert pretrain_moe.main(old) == 0
    # How activations are kept and the loss computed is not the model: such flags may change on resume.
    memory = more + ["--load", save, "--log-json", os.path.join(tmp, "memory.jsonl"),
                         "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers",
                         "2", "--cross-entropy-chunk-size", "5"]
    assert pretrain_moe.main(memory) == 0


def test_load_takes_a_save_root_or_one_iteration_directory(tmp_path):
    """--load DIR/iter_0000002 resumes that checkpoint exactly as --load DIR (whose marker names
    it), and an older iteration directory resumes from that iteration."""
    run_distributed(_resume_body, 1, str(tmp_path), timeout=300)
    logs = {name: read_json_log(tmp_path / f"{name}.jsonl") for name in ("root", "dir", "old")}
    assert [r["iteration"] for r in logs["root"]] == [r["iteration"] for r in logs["dir"]] == [3]
    assert logs["dir"][0]["lm_loss"] == logs["root"][0]["lm_loss"]
    assert [r["iteration"] for r in logs["old"]] == [2, 3]
    memory = read_json_log(tmp_path / "memory.jsonl")
    assert [r["iteration"] for r in memory] == [3]
    assert memory[0]["lm_loss"] == pytest.approx(logs["root"][0]["lm_loss"], rel=1e-6)
