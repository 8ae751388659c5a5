"""Elastic training: how long a lost node stops the run, and how many steps of work it costs.

    python bench/bench_elastic.py                               # save intervals 1, 5 and 20
    python bench/bench_elastic.py --save-intervals 5 --kill-after 12

For each save interval: two torchrun "nodes" of 2 CPU ranks on this machine (``--nnodes 1:2``,
c10d rendezvous on a store served here, the tiny MoE of the tests with EP 2 and ZeRO-1, a save
every ``--save-interval`` iterations) train until iteration ``--kill-after`` is logged (by default
the one before a save: the most work a loss can cost); then node b
(its agent and its workers' sessions) is SIGKILLed and node a goes on alone.  Printed, in seconds
from the kill, the time each event reached node a's output: detection (its workers' collective
fails and its agent sees a worker exit), rendezvous (the new world's layout line: rendezvous plus worker start-up), load (the
checkpoint loaded) and the first completed step; and the steps of work lost (the last iteration
logged before the kill minus the iteration resumed from).  Rendezvous timing: a dead node is
noticed after 5 missed 1 s heartbeats, and a round closes 1 s after its first node joined
(``--rdzv-conf``; torch's defaults are 15 s and 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from megamoe.parallel.rendezvous import rendezvous_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--device", "cpu", "--mock-data", "--vocab-size", "200", "--seq-length", "16", "--num-layers", "2",
         "--hidden-size", "32", "--ffn-hidden-size", "48", "--max-position-embeddings", "16", "--swiglu",
         "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "1e-2", "--log-interval", "1", "--seed", "7",
         "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--elastic"]
RDZV_CONF = "is_host=false,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=5"
# Each event: the first line after the previous one that holds one of these texts.  Detection is
# the agent's (a worker exited, or the agent stops the others), not the worker's own error text,
# which a killed peer's collective does not always print.
EVENTS = (("detection", ("failed (exitcode", "closing signal")), ("rendezvous", ("elastic layout for world 2",)),
          ("load", ("loaded checkpoint",)), ("first step", ("iter ",)))


class Node:
    """One torchrun agent with 2 workers, its output lines timestamped as they arrive."""

    def __init__(self, port: int, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2",
             "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "bench-elastic", "--rdzv-conf", RDZV_CONF, "--monitor-interval", "0.1",
             os.path.join(REPO, "pretrain_moe.py"), *argv],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def kill(self) -> None:
        """SIGKILL the agent, then each worker's session (torchrun starts them in their own)."""
        workers, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                children = []
            workers += children
            todo += children
        for pid in [self.proc.pid, *workers]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _logged(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def measure(save_interval: int, kill_after: int, tmp: str) -> dict:
    """Run the two nodes, kill b once iteration ``kill_after`` is logged, and time a's recovery."""
    save, log = os.path.join(tmp, f"ckpt{save_interval}"), os.path.join(tmp, f"log{save_interval}.jsonl")
    argv = [*MODEL, "--train-iters", str(kill_after + 40), "--save", save, "--load", save,
            "--save-interval", str(save_interval), "--log-json", log]
    with rendezvous_store() as port:
        a, b = Node(port, argv), Node(port, argv)
        while not any(r["iteration"] >= kill_after for r in _logged(log)):
            if a.proc.poll() is not None or b.proc.poll() is not None:
                raise RuntimeError("a node ended before the kill:\n" + "".join(line for _, line in a.lines + b.lines))
            time.sleep(0.01)
        b.kill()
        killed = time.monotonic()
        before = max(r["iteration"] for r in _logged(log))
        a.proc.wait(timeout=600)
        a.reader.join()
    if a.proc.returncode != 0:
        raise RuntimeError("node a failed:\n" + "".join(line for _, line in a.lines))
    after = [(t, line) for t, line in a.lines if t >= killed]
    result = {}
    for name, texts in EVENTS:
        start = result.get("_at", killed)
        at = next((t for t, line in after if t >= start and any(text in line for text in texts)), None)
        if at is None:
            raise RuntimeError(f"no {name} ({texts}) on node a after the kill:\n" + "".join(line for _, line in after))
        result[name], result["_at"] = at - killed, at
    resumed = next(line for _, line in after if "loaded checkpoint" in line)
    resumed_at = int(resumed.split("(iteration ")[1].split(",")[0])
    result["lost"] = before - resumed_at
    del result["_at"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-intervals", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--kill-after", type=int, default=None,
                   help="kill node b once this iteration is logged (default: the one before the second save, "
                        "the worst case: 2 x interval - 1, at least 3)")
    args = p.parse_args()
    print("seconds from the kill to each event on the surviving node (cumulative), and the steps redone")
    print(f"{'save interval':>13} {'detection s':>11} {'rendezvous s':>12} {'load s':>7} {'first step s':>12} "
          f"{'steps lost':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for interval in args.save_intervals:
            r = measure(interval, args.kill_after or max(2 * interval - 1, 3), tmp)
            print(f"{interval:>13} {r['detection']:>11.2f} {r['rendezvous']:>12.2f} {r['load']:>7.2f} "
                  f"{r['first step']:>12.2f} {r['lost']:>10}", flush=True)


if __name__ == "__main__":
    main()
