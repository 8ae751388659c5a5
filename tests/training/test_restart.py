"""Self-healing restarts: under ``torchrun --max-restarts``, a worker killed with SIGKILL is
restarted with the others, the new round rendezvouses afresh and resumes from the latest
checkpoint, and the run ends with exactly the losses of an uninterrupted one (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time

from tests.fixtures import REPO, TINY_MOE, read_json_log

ITERS = 20  # far more than the 3 the kill waits for: the run must still be training when it comes
ARGS = TINY_MOE + ["--train-iters", str(ITERS), "--save-interval", "2", "--expert-model-parallel-size", "2"]


def _torchrun(*args: str, max_restarts: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", str(max_restarts), "pretrain_moe.py", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _workers(agent_pid: int) -> list[int]:
    """The worker processes torchrun's agent started (its children)."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_killed_worker_is_restarted_and_resumes_exactly(tmp_path):
    straight_log = tmp_path / "straight.jsonl"
    straight = _torchrun(*ARGS, "--save", str(tmp_path / "straight"), "--log-json", str(straight_log), max_restarts=0)

    log = tmp_path / "killed.jsonl"
    save = str(tmp_path / "killed")
    run = _torchrun(*ARGS, "--save", save, "--load", save, "--log-json", str(log), max_restarts=1)
    # Kill rank 1 once iteration 3 is logged: the checkpoint of iteration 2 is the one to resume from.
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if log.exists() and any(r["iteration"] >= 3 for r in read_json_log(log) if "lm_loss" in r and "split" not in r):
            break
        time.sleep(0.1)
    victim = _workers(run.pid)[1]
    os.kill(victim, signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out

    want = {r["iteration"]: r for r in read_json_log(straight_log)}
    got = read_json_log(log)
    iterations = [r["iteration"] for r in got]
    assert len(iterations) > len(set(iterations)), f"no iteration ran twice, so no restart happened: {iterations}"
    assert iterations[-1] == ITERS
    for record in got:  # both rounds, every iteration: the losses of the uninterrupted run
        assert record["lm_loss"] == want[record["iteration"]]["lm_loss"], (record, want[record["iteration"]])
        assert record["grad_norm"] == want[record["iteration"]]["grad_norm"]
