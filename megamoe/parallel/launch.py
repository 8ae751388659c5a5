"""Bringing up torch.distributed: the one place that calls ``init_process_group``.

    init_distributed(device)                     # torchrun's environment, or a 1-rank job without it
    init_distributed(device, rank=r, world_size=w, store_path=path)   # spawned workers, a file store
    spawn_cpu_ranks(body, world_size, *args)     # a script's own gloo ranks (the benchmarks)

The backend follows the device (NCCL on CUDA, gloo on CPU).  The megamoe groups are built
afterwards by ``megamoe.parallel.state.initialize_model_parallel``.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.parallel.state import default_backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round_store() -> dist.Store:
    """The store this round of torchrun's workers forms its process groups through.

    Two cases, told apart by ``TORCHELASTIC_USE_AGENT_STORE``:

    * torch's default: every worker is a client of the rank-0 agent's TCP store, which outlives
      the rounds of ``--max-restarts``.  Each round works under a prefix of its own, or a restarted
      worker would read the addresses the dead round wrote for every process group (gloo/NCCL:
      "connectFullMesh ... refused").  The prefix is the agent's restart count, which only the
      rounds of one agent agree on: a restart for a node that joins is not counted, so several
      nodes that restart (``--elastic``) must turn the sharing off;
    * ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment: the rank-0 agent picks a
      free port each round and the rank-0 worker hosts a new store on it, so a round has nothing
      stale to read and every node agrees without a prefix."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=rank == 0 and not agent_hosts_store, timeout=timedelta(minutes=10),
    )
    if not agent_hosts_store:
        return store
    return dist.PrefixStore(f"megamoe/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def init_distributed(device: torch.device, *, rank: int | None = None, world_size: int | None = None,
                     store_path: str | None = None, timeout: timedelta | None = None) -> None:
    """Initialise the default process group once (a no-op when it exists).

    Without ``store_path``: from torchrun's environment, or, when there is none, as a 1-rank job
    on a free local port (RANK, LOCAL_RANK and WORLD_SIZE are set as torchrun would).  With
    ``store_path``: ``world_size`` processes meet through that file, this one as ``rank`` (no
    port to collide on; the tests and the benchmarks that spawn their own workers).  ``timeout``
    (--distributed-timeout-minutes): how long a collective waits; None: torch's default."""
    if dist.is_initialized():
        return
    backend = default_backend(device)
    options = {"device_id": device} if backend == "nccl" else {}
    if timeout is not None:
        options["timeout"] = timeout
    if store_path is not None:
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                **options)
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend, store=_round_store(), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), **options)


def _spawned(rank, world_size, store_path, queue, body, args) -> None:
    torch.set_num_threads(1)
    try:
        init_distributed(torch.device("cpu"), rank=rank, world_size=world_size, store_path=store_path)
        # Plain pickle copies tensors into the message (the queue's pickler would send shared-memory
        # handles that die with this process).
        queue.put((rank, None, pickle.dumps(body(rank, world_size, *args))))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_cpu_ranks(body, world_size: int, *args) -> list:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` spawned CPU processes joined by gloo
    over a file store; returns their picklable results (tensors included) indexed by rank.
    ``body`` must be a module-level function.  A failing rank's traceback is raised here as a
    ``RuntimeError``."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(_spawned, args=(world_size, os.path.join(tmp, "store"), queue, body, args),
                                   nprocs=world_size, start_method="spawn", join=False)
        # Read before joining: a result larger than the pipe's buffer blocks its sender until then.
        results, failure = {}, None
        for _ in range(world_size):
            rank, error, payload = queue.get()
            if error is not None:
                failure = failure or f"rank {rank} failed:\n{error}"
                break
            results[rank] = pickle.loads(payload)
        if failure is not None:
            for process in procs.processes:
                process.kill()
            raise RuntimeError(failure)
        while not procs.join():
            pass
    return [results[rank] for rank in range(world_size)]
