"""Self-healing restarts: under ``torchrun --max-restarts``, a worker killed with SIGKILL is
restarted with the others, the new round rendezvouses afresh and resumes from the latest
checkpoint, and the run ends with exactly the losses of an uninterrupted one (CPU, fp32): at EP 2
on 2 ranks, and at PP 2 x EP 2 with ZeRO-1 on 4 (a pipeline stage's worker killed).

The kill must not race the training: the workers are frozen (SIGSTOP) first, so the iterations
logged and the checkpoint published are read from a run that cannot move, and the kill lands at
a known point; whether an iteration runs twice then depends only on those two numbers, never on
timing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megamoe.parallel.local_nodes import child_pids
from tests.fixtures import REPO, TINY_MOE, read_json_log

ITERS = 12  # more than the 3 the kill waits for: the run is still training when the workers are frozen
ARGS = TINY_MOE + ["--train-iters", str(ITERS), "--save-interval", "2", "--expert-model-parallel-size", "2"]
# (ranks, flags added to ARGS)
LAYOUTS = {
    "ep2": (2, []),
    "pp2_ep2_zero1": (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


def _torchrun(*args: str, nproc: int, max_restarts: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "--max-restarts", str(max_restarts), "pretrain_moe.py", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _logged(log) -> list[int]:
    """The training iterations logged so far (complete lines only: the run may be writing one)."""
    if not log.exists():
        return []
    lines = log.read_text().split("\n")[:-1]
    return [r["iteration"] for r in map(json.loads, lines) if "split" not in r]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_killed_worker_is_restarted_and_resumes_exactly(tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    args = [*ARGS, *extra]
    straight_log = tmp_path / "straight.jsonl"
    straight = _torchrun(*args, "--save", str(tmp_path / "straight"), "--log-json", str(straight_log), nproc=nproc,
                         max_restarts=0)

    log = tmp_path / "killed.jsonl"
    save = tmp_path / "killed"
    run = _torchrun(*args, "--save", str(save), "--load", str(save), "--log-json", str(log), nproc=nproc,
                    max_restarts=1)
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if len(_logged(log)) >= 3:
            break
        time.sleep(0.02)
    workers = child_pids(run.pid)
    assert run.poll() is None and len(workers) == nproc, "the run ended before it could be frozen"
    victim = workers[-1]  # at PP 2: a worker of the last stage
    os.kill(victim, signal.SIGSTOP)
    # Every step needs every worker: the others finish what it had begun (a log line, a
    # publish) and then waits in a collective.  Nothing moves after this pause.
    time.sleep(1.0)
    logged = _logged(log)
    published = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert logged[-1] < ITERS, "frozen after the last iteration: the restart would have nothing to redo"
    os.kill(victim, signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out

    want = {r["iteration"]: r for r in read_json_log(straight_log)}
    got = read_json_log(log)
    # The first round's iterations, then the second round's from the checkpoint it loaded on.
    assert [r["iteration"] for r in got] == logged + list(range(published + 1, ITERS + 1)), (logged, published)
    assert f"loaded checkpoint {save}/iter_{published:07d} (iteration {published}," in out, out
    for record in got:  # both rounds, every iteration: the losses of the uninterrupted run
        assert record["lm_loss"] == want[record["iteration"]]["lm_loss"], (record, want[record["iteration"]])
        assert record["grad_norm"] == want[record["iteration"]]["grad_norm"]
