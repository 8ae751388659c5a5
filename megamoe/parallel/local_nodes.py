"""The processes of a torchrun "node" on this machine: its agent and the workers it started.

Used where nodes are simulated on one machine (the elastic bench, the restart, stop and elastic
tests) to find the workers to signal and to take a node down as a lost machine would go.  Linux
only: the children are read from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (an agent's: its workers); empty once it has exited."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid``, children before grandchildren."""
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found += children
        todo += children
    return found


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node as a lost machine goes: the agent's session, then every worker's (torchrun
    starts each worker in a session of its own), then reap the agent.  The agent must have been
    started with ``start_new_session=True``."""
    workers = descendant_pids(agent.pid)
    for pid in [agent.pid, *workers]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
