"""The one multi-process harness every distributed test uses.

``run_distributed(body, world_size, *args, tensor_model_parallel_size=..., expert_model_parallel_sizes=...)``
runs ``body(rank, world_size, *args)`` on ``world_size`` processes that have brought up
``torch.distributed`` with gloo over a fresh file store (no port to collide on) and, optionally,
the megamoe groups, which the body reads with ``current_layout()``.  ``init_layout(...)`` builds
another layout inside a body (megamoe keeps none in module state: the tests hold theirs here).  ``body`` must be a module-level function (it is pickled by name).  The first
failing rank's traceback becomes the pytest failure; a rank that hangs past ``timeout`` or dies
fails the test instead of stalling CI.  Return values of ``body`` (picklable, tensors included)
come back as a list indexed by rank.

The processes are kept for the session, one set per world size: starting a process and
importing torch costs more than most bodies.  Each call gets a new process group, and afterwards
each process is put back as it was: the megamoe groups and the process group destroyed, the
environment, working directory, SIGTERM and SIGINT handlers, default dtype and torch's seed restored.  A call
that fails or hangs kills its set; the next call starts a new one.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import queue
import signal
import tempfile
import time
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 240.0
_POLL = 0.5  # seconds between checks that every worker is still alive


_LAYOUT = None  # the layout the current body runs in (init_layout), per worker process


def init_layout(tp: int = 1, ep_sizes=(1,), *, etp: int | None = None, sp: bool = False, experts_by_layer=None,
                **pipeline):
    """Build the megamoe groups of TP ``tp``, EP ``ep_sizes`` (one value, or one per MoE layer of
    ``experts_by_layer``: ``ModelConfig.experts_by_layer()``), ETP ``etp`` and sequence
    parallelism ``sp`` over the running world; it becomes ``current_layout()``.  ``pipeline``:
    ``ParallelConfig``'s pipeline fields (``pipeline_model_parallel_size``, ``num_layers``, ...)."""
    global _LAYOUT
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.state import initialize_model_parallel

    config = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=tuple(ep_sizes),
                            expert_tensor_parallel_size=etp, sequence_parallel=sp, **pipeline)
    _LAYOUT = initialize_model_parallel(config, experts_by_layer)
    return _LAYOUT


def current_layout():
    """The layout of the last ``init_layout`` of this call (the harness's own, by default)."""
    assert _LAYOUT is not None, "no layout: pass tensor_model_parallel_size to run_distributed, or call init_layout"
    return _LAYOUT


def _forget_layout() -> None:
    global _LAYOUT
    _LAYOUT = None


def _isolated_call(rank, world_size, store_path, body, args, groups, seed):
    """One call of ``body`` on this rank, the process put back as it was afterwards; torch's
    default generator starts from ``seed``, as in a new process."""
    import torch
    import torch.distributed as dist

    from megamoe.parallel.launch import init_distributed

    environ, cwd = dict(os.environ), os.getcwd()
    sigterm, sigint, dtype = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        init_distributed(torch.device("cpu"), rank=rank, world_size=world_size, store_path=store_path)
        if groups is not None:
            init_layout(*groups)
        value = body(rank, world_size, *args)
        # No rank tears its sockets down while another is still connecting a group.
        dist.barrier()
        return value
    finally:
        # The body's objects (reference cycles: autograd graphs, hooks) let go of their process
        # groups before the groups are destroyed; a group destroyed while still referenced keeps
        # its gloo threads for the life of the process.
        gc.collect()
        _forget_layout()
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(signal.SIGINT, sigint)
        torch.set_default_dtype(dtype)


def _serve(rank, world_size, tasks, results):
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    seed = torch.initial_seed()
    while True:
        call_id, store_path, body, args, groups = pickle.loads(tasks.get())
        try:
            value = _isolated_call(rank, world_size, store_path, body, args, groups, seed)
            # Plain pickle copies tensors into the message; the queue's own pickler would pass
            # shared-memory handles that die with this process.
            results.put((call_id, rank, "ok", pickle.dumps(value)))
        except BaseException:
            results.put((call_id, rank, "error", traceback.format_exc()))


class _Workers:
    """``world_size`` processes serving calls, one task queue each and one result queue."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.calls = 0
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, self.tasks[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def call(self, body, args, groups, timeout: float) -> list:
        self.calls += 1
        with tempfile.TemporaryDirectory() as tmp:
            task = pickle.dumps((self.calls, os.path.join(tmp, "store"), body, args, groups))
            for q in self.tasks:
                q.put(task)
            outcomes = {}
            deadline = time.monotonic() + timeout
            while len(outcomes) < self.world_size:
                try:
                    call_id, rank, status, value = self.results.get(timeout=_POLL)
                except queue.Empty:
                    dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead:
                        raise AssertionError(f"ranks {dead} died (exit codes "
                                             f"{[self.procs[r].exitcode for r in dead]})") from None
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(self.world_size)) - set(outcomes))
                        raise AssertionError(
                            f"ranks {missing} did not finish within {timeout:.0f}s (hang or deadlock)"
                        ) from None
                    continue
                assert call_id == self.calls, f"a result of call {call_id} arrived during call {self.calls}"
                if status == "error":
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                outcomes[rank] = value
        return [pickle.loads(outcomes[r]) for r in range(self.world_size)]

    def close(self) -> None:
        """Kill the processes: they hold nothing that needs an orderly exit."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()


_workers: dict[int, _Workers] = {}


def close_workers() -> None:
    """Stop every kept set of processes (the end of the session)."""
    while _workers:
        _workers.popitem()[1].close()


atexit.register(close_workers)


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
    groups = None
    if tensor_model_parallel_size is not None:
        groups = (tensor_model_parallel_size, tuple(expert_model_parallel_sizes))
    workers = _workers.get(world_size) or _workers.setdefault(world_size, _Workers(world_size))
    try:
        return workers.call(body, args, groups, timeout)
    except BaseException:
        del _workers[world_size]
        workers.close()
        raise
