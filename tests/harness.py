"""The one multi-process harness every distributed test uses.

``run_distributed(body, world_size, *args, tensor_model_parallel_size=..., expert_model_parallel_sizes=...)``
spawns ``world_size`` processes, brings up ``torch.distributed`` with gloo over a file store
(no port to collide on), optionally builds the megamoe groups, and calls
``body(rank, world_size, *args)`` in each.  ``body`` must be a module-level function (spawn
pickles it by name).  The first failing rank's traceback becomes the pytest failure; a rank
that hangs past ``timeout`` kills the whole group and fails the test instead of stalling CI.
Return values of ``body`` (picklable, tensors included) come back as a list indexed by rank.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 240.0


def _worker(rank, world_size, store_path, body, args, groups, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        from megamoe.parallel.launch import init_distributed

        init_distributed(torch.device("cpu"), rank=rank, world_size=world_size, store_path=store_path)
        if groups is not None:
            from megamoe.parallel.state import initialize_model_parallel

            initialize_model_parallel(*groups)
        value = body(rank, world_size, *args)
        # No rank tears its sockets down while another is still connecting a group.
        dist.barrier()
        # Plain pickle copies tensors into the message; the queue's own pickler would pass
        # shared-memory handles that die with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    body,
    world_size: int,
    *args,
    tensor_model_parallel_size: int | None = None,
    expert_model_parallel_sizes=(1,),
    timeout: float = DEFAULT_TIMEOUT,
):
    """Run ``body(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    With ``tensor_model_parallel_size`` set, ``initialize_model_parallel`` is called first.
    """
    ctx = mp.get_context("spawn")
    groups = None
    if tensor_model_parallel_size is not None:
        groups = (tensor_model_parallel_size, tuple(expert_model_parallel_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store_path, body, args, groups, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes = {}
        errors = []
        try:
            import queue

            while len(outcomes) < world_size:
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise AssertionError(
                        f"ranks {missing} did not finish within {timeout:.0f}s (hang or deadlock)"
                        + ("\n\nfirst error:\n" + errors[0] if errors else "")
                    ) from None
                outcomes[rank] = (status, value)
                if status == "error":
                    errors.append(f"rank {rank} failed:\n{value}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError(errors[0])
        return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
