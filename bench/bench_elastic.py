"""Elastic training: how long a lost node stops the run, how long a returning one takes to join,
and how many steps of work each costs.

    python bench/bench_elastic.py                               # save intervals 1, 5 and 20
    python bench/bench_elastic.py --save-intervals 5 --kill-after 12

For each save interval: two torchrun "nodes" of 2 CPU ranks on this machine (``--nnodes 1:2``,
c10d rendezvous on a store served here, the agent store not shared, the tiny MoE of the tests with
EP 2, ZeRO-1 and --save-on-rendezvous-change, a save every ``--save-interval`` iterations) train
until iteration ``--kill-after`` is logged (by default the one before a save: the most work a loss
can cost); then node b (its agent and its workers' sessions) is SIGKILLed and node a goes on alone.
Printed, in seconds from the kill, the time each event reached node a's output: detection (its
workers' collective fails and its agent sees a worker exit), rendezvous (the new world's layout
line: rendezvous plus worker start-up), load (the checkpoint loaded) and the first completed step;
and the steps of work lost (the last iteration logged before the kill minus the iteration resumed
from).  Then, 3 steps later, node b is started again, and the same events are timed from its
start: detection (node a's agent stops its workers for the newcomer; node b's own start-up comes
first), the world of 4's layout, load and first step; the steps lost are 0 when the workers could
save at the end of their step (--save-on-rendezvous-change).  Rendezvous timing: a dead node is
noticed after 5 missed 1 s heartbeats, a round closes 1 s after its first node joined
(``--rdzv-conf``; torch's defaults are 15 s and 30 s), and an agent looks for waiting nodes every
0.1 s (``--monitor-interval``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from megamoe.parallel.local_nodes import kill_node
from megamoe.parallel.rendezvous import rendezvous_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--device", "cpu", "--mock-data", "--vocab-size", "200", "--seq-length", "16", "--num-layers", "2",
         "--hidden-size", "32", "--ffn-hidden-size", "48", "--max-position-embeddings", "16", "--swiglu",
         "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "1e-2", "--log-interval", "1", "--seed", "7",
         "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--elastic", "--save-on-rendezvous-change"]
RDZV_CONF = "is_host=false,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=5"
# Each event: the first line after the previous one that holds one of these texts.  Detection is
# the agent's (a worker exited, or the agent stops the others), not the worker's own error text,
# which a killed peer's collective does not always print.
SHRINK = (("detection", ("failed (exitcode", "closing signal")), ("rendezvous", ("elastic layout for world 2",)),
          ("load", ("loaded checkpoint",)), ("first step", ("iter ",)))
GROW = (("detection", ("closing signal",)), ("rendezvous", ("elastic layout for world 4",)),
        ("load", ("loaded checkpoint",)), ("first step", ("iter ",)))


class Node:
    """One torchrun agent with 2 workers, its output lines timestamped as they arrive."""

    def __init__(self, port: int, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2",
             "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "bench-elastic", "--rdzv-conf", RDZV_CONF, "--monitor-interval", "0.1",
             os.path.join(REPO, "pretrain_moe.py"), *argv],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def kill(self) -> None:
        """SIGKILL the node as a lost machine goes (``local_nodes.kill_node``)."""
        kill_node(self.proc)


def _logged(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _timeline(events, lines: list[tuple[float, str]], since: float, what: str) -> dict:
    """Seconds from ``since`` to each event: the first line after the previous event holding one
    of its texts."""
    after = sorted((t, line) for t, line in lines if t >= since)
    result, at = {}, since
    for name, texts in events:
        at = next((t for t, line in after if t >= at and any(text in line for text in texts)), None)
        if at is None:
            raise RuntimeError(f"no {name} ({texts}) after the {what}:\n" + "".join(line for _, line in after))
        result[name] = at - since
    return result


def _resumed_at(lines: list[tuple[float, str]], since: float) -> int:
    line = next(line for t, line in sorted(lines) if t >= since and "loaded checkpoint" in line)
    return int(line.split("(iteration ")[1].split(",")[0])


def _last_step(lines: list[tuple[float, str]], until: float) -> int:
    """The last iteration whose log line arrived before ``until``."""
    return max(int(line.split("iter ")[1].split("/")[0]) for t, line in lines if t < until and "iter " in line)


def _stepped_after(lines: list[tuple[float, str]], since: float, text: str) -> bool:
    """Whether a log line of a step arrived after a line holding ``text``, both after ``since``."""
    seen = False
    for t, line in sorted(lines):
        seen = seen or (t >= since and text in line)
        if seen and "iter " in line:
            return True
    return False


def _wait(done, nodes: list[Node], what: str) -> None:
    while not done():
        if any(node.proc.poll() is not None for node in nodes):
            raise RuntimeError(f"a node ended before {what}:\n" + "".join(line for n in nodes for _, line in n.lines))
        time.sleep(0.01)


def measure(save_interval: int, kill_after: int, tmp: str) -> tuple[dict, dict]:
    """Run the two nodes, kill b once iteration ``kill_after`` is logged and time a's recovery;
    3 steps later start b again and time the grown world's recovery."""
    save, log = os.path.join(tmp, f"ckpt{save_interval}"), os.path.join(tmp, f"log{save_interval}.jsonl")
    argv = [*MODEL, "--train-iters", str(kill_after + 1000), "--save", save, "--load", save,
            "--save-interval", str(save_interval), "--log-json", log]
    with rendezvous_store() as port:
        nodes = [Node(port, argv), Node(port, argv)]
        try:
            _wait(lambda: any(r["iteration"] >= kill_after for r in _logged(log)), nodes, "the kill")
            nodes[1].kill()
            killed = time.monotonic()
            _wait(lambda: _stepped_after(nodes[0].lines, killed, "elastic layout for world 2"), nodes[:1], "the shrink")
            shrink = _timeline(SHRINK, nodes[0].lines, killed, "kill")
            resumed = _resumed_at(nodes[0].lines, killed)
            shrink["lost"] = _last_step(nodes[0].lines, killed) - resumed
            _wait(lambda: _last_step(nodes[0].lines, time.monotonic()) >= resumed + 3, nodes[:1], "node b's return")
            nodes[1] = Node(port, argv)
            started = time.monotonic()
            _wait(lambda: _stepped_after(nodes[0].lines + nodes[1].lines, started, "elastic layout for world 4"), nodes,
                  "the grow")
            lines = nodes[0].lines + nodes[1].lines
            grow = _timeline(GROW, lines, started, "restart of node b")
            # The workers stopped for the newcomer may finish their step (and save it) after the agent's signal.
            grow["lost"] = _last_step(nodes[0].lines, started + grow["load"]) - _resumed_at(lines, started)
        finally:
            for node in nodes:
                node.kill()
    return shrink, grow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-intervals", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--kill-after", type=int, default=None,
                   help="kill node b once this iteration is logged (default: the one before the second save, "
                        "the worst case: 2 x interval - 1, at least 3)")
    args = p.parse_args()
    print("seconds from the change to each event (cumulative), and the steps redone; shrink: node b killed, "
          "from the kill; grow: node b started again, from its start")
    print(f"{'change':>6} {'save interval':>13} {'detection s':>11} {'rendezvous s':>12} {'load s':>7} "
          f"{'first step s':>12} {'steps lost':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for interval in args.save_intervals:
            results = measure(interval, args.kill_after or max(2 * interval - 1, 3), tmp)
            for change, r in zip(("shrink", "grow"), results):
                print(f"{change:>6} {interval:>13} {r['detection']:>11.2f} {r['rendezvous']:>12.2f} {r['load']:>7.2f} "
                      f"{r['first step']:>12.2f} {r['lost']:>10}", flush=True)


if __name__ == "__main__":
    main()
