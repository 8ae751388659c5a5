"""Elastic training as the README runs it: two torchrun "nodes" of 2 CPU ranks each on one machine
(``--nnodes 1:2 --max-restarts``, c10d rendezvous on a store served by the test), ZeRO-1 with EP 2
(kept at world 2) or EP 4 (which must fall back to 2),
a save every iteration.  Node b (its agent and its workers, which torchrun starts in sessions of
their own) is killed once a checkpoint is published; node a's agent starts new workers, which
form a world of 2, load the latest checkpoint and finish the run.  Every logged loss and grad
norm equals the uninterrupted 4-rank run's at the same iteration (fp32, 1e-6), and the data
position (``consumed_samples``) never skips or repeats a batch."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megamoe.checkpointing.format import read_marker
from megamoe.parallel.rendezvous import rendezvous_store
from tests.fixtures import REPO, TINY_MOE, read_json_log, run_main
from tests.harness import run_distributed

ITERS = 20  # the kill comes after iteration 2's save: 18 iterations of margin before the run could end
KILL_AFTER = 2
GLOBAL_BATCH = 8  # TINY_MOE's
RUN = [*TINY_MOE, "--train-iters", str(ITERS), "--use-distributed-optimizer", "--elastic"]
# Rendezvous settings that keep the test short: a dead node is noticed after 5 missed 1 s heartbeats,
# and a round closes 1 s after its minimum of nodes have joined.
RDZV_CONF = "is_host=false,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=5"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            children = []
        found += children
        todo += children
    return found


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node: its agent, then every worker's session (a lost machine)."""
    workers = _descendants(agent.pid)
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def _start_node(port: int, name: str, run: list[str], save, log, tmp_path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = open(tmp_path / f"node_{name}.out", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2",
         "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "megamoe-elastic", "--rdzv-conf", RDZV_CONF, "--monitor-interval", "0.1",
         "pretrain_moe.py", *run, "--save", str(save), "--load", str(save), "--save-interval", "1",
         "--log-json", str(log)],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(done, nodes, timeout=300.0) -> None:
    """Poll ``done()`` (a checkpoint marker, read from disk) until true; fail if a node ends first."""
    deadline = time.monotonic() + timeout
    while not done():
        ended = [node.args for node in nodes if node.poll() is not None]
        assert not ended and time.monotonic() < deadline, f"ended or timed out: {ended}"
        time.sleep(0.05)


@pytest.mark.parametrize("ep,ep_at_2", [(2, "[2, 2] (as configured)"), (4, "[2, 2] (--expert-model-parallel-size [4] "
                                                                     "does not fit")])
def test_a_lost_node_shrinks_the_run_to_the_same_loss_curve(ep, ep_at_2, tmp_path):
    """EP 2 fits both worlds; EP 4 (4 experts) must fall back to 2 at world 2."""
    run = [*RUN, "--expert-model-parallel-size", str(ep)]
    reference_log = tmp_path / "reference.jsonl"
    run_distributed(run_main, 4, [[*run, "--log-json", str(reference_log)]], timeout=600)
    reference = {r["iteration"]: r for r in read_json_log(reference_log)}

    save, log = tmp_path / "ckpt", tmp_path / "elastic.jsonl"
    with rendezvous_store() as port:
        nodes = [_start_node(port, name, run, save, log, tmp_path) for name in "ab"]
        try:
            _wait_until(lambda: (read_marker(str(save)) or 0) >= KILL_AFTER, nodes)
            _kill_node(nodes[1])
            nodes[0].wait(timeout=600)
        finally:
            for node in nodes:
                if node.poll() is None:
                    _kill_node(node)
    outputs = {name: (tmp_path / f"node_{name}.out").read_text() for name in "ab"}
    assert nodes[0].returncode == 0, outputs["a"]
    both = outputs["a"] + outputs["b"]
    assert "training: world 4 (TP 1 x DP 4)" in both, both
    assert f"elastic layout for world 2: TP 1, DP 2, ETP 1, EP per MoE layer {ep_at_2}" in outputs["a"]
    assert "training: world 2 (TP 1 x DP 2)" in outputs["a"], outputs["a"]

    records = read_json_log(log)
    assert records[-1]["iteration"] == ITERS
    restarts = [i for i in range(1, len(records)) if records[i]["iteration"] <= records[i - 1]["iteration"]]
    assert len(restarts) <= 1, [r["iteration"] for r in records]
    for record in records:
        want = reference[record["iteration"]]
        assert record["consumed_samples"] == record["iteration"] * GLOBAL_BATCH == want["consumed_samples"]
        for key in ("lm_loss", "grad_norm"):
            assert record[key] == pytest.approx(want[key], rel=1e-6, abs=0), (record["iteration"], key)
    # Every iteration once before the loss and once more for each step redone after it (at most
    # the steps since the last save: one here).
    iterations = [r["iteration"] for r in records]
    assert sorted(set(iterations)) == list(range(1, ITERS + 1)), iterations
    if restarts:
        resumed_at, stopped_at = iterations[restarts[0]], iterations[restarts[0] - 1]
        assert stopped_at - resumed_at + 1 <= 1, iterations
