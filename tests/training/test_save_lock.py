"""Two runs on one --save directory: the second is refused before any work, naming the first;
the lock dies with its holder, so a killed run (or a torchrun restart, tests/training/
test_restart.py) takes the directory again."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import pretrain_moe
from tests.fixtures import REPO, TINY_MOE
from tests.harness import run_distributed

ARGS = TINY_MOE + ["--train-iters", "1"]

# Another run's rank 0, as far as the lock goes: it holds the lock, says so, and waits.
HOLDER = """
import sys, time
from megamoe.training.save_lock import SaveLock
acquired, _ = SaveLock(sys.argv[1]).acquire()
print("locked" if acquired else "refused", flush=True)
time.sleep(600)
"""


def _refused(rank, world, save, log):
    from megamoe.checkpointing.format import CheckpointError
    from megamoe.training.arguments import parse_config
    from megamoe.training.trainer import pretrain

    os.environ["WORLD_SIZE"] = str(world)
    with pytest.raises(CheckpointError) as refusal:
        pretrain(parse_config(ARGS + ["--save", save, "--log-json", log]))
    assert not os.path.exists(log) or not open(log).read().strip(), "a training step ran before the refusal"
    return str(refusal.value)


def _trains(rank, world, save):
    os.environ["WORLD_SIZE"] = str(world)
    for _ in range(2):  # the lock of a finished run is released: the same process saves there again
        assert pretrain_moe.main(ARGS + ["--save", save]) == 0


def test_second_run_on_a_save_directory_is_refused_until_the_first_is_gone(tmp_path):
    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, save], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = run_distributed(_refused, 2, save, str(tmp_path / "never.jsonl"))[0]
        assert re.fullmatch(
            re.escape(f"--save {save} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, since ")
            + r"[0-9: -]+ UTC; lock file " + re.escape(os.path.join(save, ".megamoe-run.lock"))
            + r"\): wait for it to end, or give another --save", message), message
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the holder never releases the lock itself
        holder.wait()
    run_distributed(_trains, 2, save)
    assert os.path.isdir(os.path.join(save, "iter_0000001"))
