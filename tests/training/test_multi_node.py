"""The README's multi-node commands, run as written on one machine: two torchrun "nodes" of one
CPU rank each meet at 127.0.0.1, by static rendezvous (--node-rank, --master-addr, --master-port:
what scripts/pretrain_1b_4exp.sh runs) and by c10d rendezvous (--rdzv-endpoint, --rdzv-id), and
train together as one world of 2.  The c10d form's store is served by the test
(megamoe.parallel.rendezvous), as the README advises: a store hosted by one of the agents dies with
it, and the other agent may still poll it then."""

import contextlib
import os
import socket
import subprocess
import sys

import pytest

from megamoe.parallel.rendezvous import rendezvous_store
from tests.fixtures import REPO, TINY_MOE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(form: str, node: int, port: int) -> list[str]:
    if form == "static":
        return ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "megamoe-test",
            "--rdzv-conf", "is_host=false"]


@pytest.mark.parametrize("form", ["static", "c10d"])
def test_two_nodes_train_as_one_world(form, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    with contextlib.nullcontext(_free_port()) if form == "static" else rendezvous_store() as port:
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             *_node_args(form, node, port), "--max-restarts", "0", "pretrain_moe.py", *TINY_MOE,
             "--train-iters", "2", "--expert-model-parallel-size", "2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out
    assert sum("training: world 2 (TP 1 x DP 2)" in out for out in outputs) == 1, outputs  # rank 0 logs
    assert sum("iter      2/2" in out for out in outputs) == 1, outputs
