"""A rendezvous store that outlives every torchrun agent (``--rdzv-backend c10d``).

    with rendezvous_store("0.0.0.0", 29500) as port:      # or: python tools/rendezvous_store.py --port 29500
        ...  # every node: torchrun --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-conf is_host=false ...

Without it, torch's c10d rendezvous hosts its TCP store inside one of the agents: the first one
whose ``--rdzv-endpoint`` names its own machine and that binds the port (any agent when the
endpoint is a loopback address).  That agent's process is then the store's lifetime, which two
things break:

* the other agents still use the store after the host agent is gone: a finished agent closes the
  rendezvous and exits while another one is still polling it for waiting nodes
  (``num_nodes_waiting``, every monitor interval, not guarded), which then dies with
  ``RendezvousConnectionError``; in an elastic run, losing the host agent's node loses the store,
  and so the rendezvous of every survivor;
* an agent that fails to bind the port (held by another process) silently becomes a client of
  whatever holds it, and the job's lifetime becomes that process's.

A store served by a process of its own, started before the agents and stopped after the last one,
has neither problem: every agent is a client (``is_host=false``), and no agent's exit or loss
takes the store with it.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def rendezvous_store(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Serve a TCP store for torchrun's c10d rendezvous on ``host:port`` (0: a free port, chosen
    and held at once, so no other process can take it in between) while the block runs; yields the
    port.  The agents connect with ``--rdzv-endpoint host:port --rdzv-conf is_host=false``."""
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                          timeout=timedelta(minutes=10))
    try:
        yield store.port
    finally:
        del store
