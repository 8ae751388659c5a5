"""Bringing up torch.distributed: the one place that calls ``init_process_group``.

    init_distributed(device)                     # torchrun's environment, or a 1-rank job without it
    init_distributed(device, rank=r, world_size=w, store_path=path)   # spawned workers, a file store

The backend follows the device (NCCL on CUDA, gloo on CPU).  The megamoe groups are built
afterwards by ``megamoe.parallel.state.initialize_model_parallel``.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megamoe.parallel.state import default_backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, *, rank: int | None = None, world_size: int | None = None,
                     store_path: str | None = None) -> None:
    """Initialise the default process group once (a no-op when it exists).

    Without ``store_path``: from torchrun's environment, or, when there is none, as a 1-rank job
    on a free local port (RANK, LOCAL_RANK and WORLD_SIZE are set as torchrun would).  With
    ``store_path``: ``world_size`` processes meet through that file, this one as ``rank`` (no
    port to collide on; the tests and the benchmarks that spawn their own workers)."""
    if dist.is_initialized():
        return
    backend = default_backend(device)
    options = {"device_id": device} if backend == "nccl" else {}
    if store_path is not None:
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                **options)
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend, **options)
