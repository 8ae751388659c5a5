"""Count the memory traffic and kernel launches of PyTorch ops as they run, on any device (the
``meta`` device included: shapes are all it needs).  Used by ``bench_step_traffic.py``.

``TrafficCounter`` is a ``TorchDispatchMode``: it sees every ATen op below autograd (forward and
backward, optimizer, collectives) and records, per (phase, category, op):

* bytes read: every tensor argument once, as many bytes as it has distinct elements (a broadcast
  dim of stride 0 counts once); an ``out=`` argument and the destination of ``copy_``/``fill_``/
  ``zero_`` are not read; a gather (``embedding``, ``index_select``, ``gather``) reads only the rows
  it returns; a scatter into an existing tensor (``index_copy_``, ``index_put_``, ``scatter_add_``,
  ``index_add_``) reads its source and index (and, when it adds, the rows it adds to);
* bytes written: every argument the op mutates and every fresh tensor it returns (a scatter
  writes only its source's rows);
* kernel launches: one per op that moves data, none for views, metadata and uninitialised
  allocations (``empty``); a multi-tensor op (``_foreach_*``, ``_fused_*``) as CUDA's
  ``multi_tensor_apply`` splits it: a launch per 320 blocks of 65,536 elements, or per
  ``110 / 64 / 48 / 36 / 30`` tensors for 1 to 5 tensor lists, whichever comes first.

These are the bytes an ideal kernel of each op moves (caches ignored): what an eager step costs
in memory bandwidth, op by op.

Phases are set by the caller (``with counter.phase("optimizer")``); inside an autograd backward
the phase is ``backward``.  Categories: ``gemm`` (matmuls, grouped GEMMs, attention kernels),
``comm`` (collectives, and any op writing into a registered gradient buffer), ``host`` (a read of
a device tensor to the host), ``other``.

A read to the host of a tensor without data (meta, or a fake tensor) is answered by ``host_value(tensor)``, so that
code which syncs (split sizes, the grad norm) runs on: the caller states what it assumes.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

GEMM_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addmv", "mv", "dot",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_forward", "_flash_attention_backward",
}
GATHERS = {"embedding", "index_select", "gather"}  # read only the rows they return from arg 0
SCATTERS = {"index_copy_", "index_put_", "_index_put_impl_", "scatter_", "scatter_add_", "index_add_"}
ADDING_SCATTERS = {"scatter_add_", "index_add_"}
OVERWRITES = {"copy_", "fill_", "zero_"}  # the destination is written, not read
ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
# CUDA multi_tensor_apply limits (ATen's MultiTensorApply.cuh): tensors per launch by list depth.
MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
CHUNK, MAX_BLOCKS = 65536, 320


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a dim of stride 0 is read once)."""
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            numel *= size
    return numel * t.element_size() if t.numel() else 0


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def _scatter_bytes(name: str, args) -> int:
    """Bytes a scatter writes into its destination: its source's (or, for a scalar, the index's rows)."""
    source = args[2] if name in ("index_put_", "_index_put_impl_") else args[3]
    if isinstance(source, torch.Tensor):
        return distinct_bytes(source)
    index = args[2]
    return index.numel() * args[0].element_size()


def multi_tensor_launches(lists: list[list[torch.Tensor]]) -> int:
    """Kernels ``multi_tensor_apply`` launches for these aligned tensor lists."""
    depth = len(lists)
    if not depth or not lists[0]:
        return 0
    max_tensors = MAX_TENSORS.get(depth, 30)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        chunks = math.ceil(t.numel() / CHUNK)
        tensors += 1
        while chunks:
            take = min(chunks, MAX_BLOCKS - blocks)
            blocks += take
            chunks -= take
            if blocks == MAX_BLOCKS or tensors == max_tensors:
                launches += 1
                blocks = 0
                tensors = 0 if not chunks else 1
    return launches + (1 if blocks else 0)


@dataclass
class OpCount:
    calls: int = 0
    read: int = 0
    written: int = 0
    launches: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written


class TrafficCounter(TorchDispatchMode):
    """Records ``OpCount``s in ``self.counts[(phase, category, op name)]``; see the module docstring.

    ``grad_buffers``: tensors (fp32 main-grad buffers) whose storage marks an op as ``comm``
    when it writes into it.  ``host_value(tensor) -> list | number``: the values a host read of a
    data-less tensor returns.
    """

    def __init__(self, *, grad_buffers=(), host_value=None) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str, str], OpCount] = defaultdict(OpCount)
        self._phase = "forward"
        self.grad_storages = {_storage(t) for t in grad_buffers}
        self.host_value = host_value
        self.host_reads = 0
        self._suppressed = 0

    @contextlib.contextmanager
    def suppressed(self):
        """Ops run inside are not counted: the caller records them as one kernel (``record``)."""
        self._suppressed += 1
        try:
            yield
        finally:
            self._suppressed -= 1

    def record(self, name: str, *, read: int, written: int, launches: int = 1, category: str = "other") -> None:
        """Count a kernel the caller models itself (e.g. one fused kernel for a decomposed op)."""
        self._add(category, name, read=read, written=written, launches=launches)

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _current_phase(self) -> str:
        return "backward" if torch._C._current_graph_task_id() != -1 else self._phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        host = self._host_read(func, args, kwargs)
        if host is not None:
            return host
        out = func(*args, **kwargs)
        if self._suppressed:
            return out
        if func.namespace == "c10d":
            size = sum(distinct_bytes(t) for t in _tensors((args, kwargs)))
            self._add("comm", name, read=size, written=size, launches=1)
            return out
        self._count(func, name, args, kwargs, out)
        return out

    def _host_read(self, func, args, kwargs):
        """A copy of a data-less tensor to the host (``.tolist()``, ``.item()``): ``host_value``'s answer."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None or not (src.is_meta or isinstance(src, FakeTensor)) or src.device.type == "cpu":
            return None
        if func is aten._local_scalar_dense.default:
            self.host_reads += 1
            self._add("host", "item", read=src.element_size(), written=0, launches=0)
            return self.host_value(src)
        to_host = func in (aten._to_copy.default, aten.to.device) and str(kwargs.get("device", "meta")) == "cpu"
        if to_host:
            self.host_reads += 1
            self._add("host", "to_host", read=distinct_bytes(src), written=0, launches=0)
            dtype = kwargs.get("dtype") or src.dtype
            with _disable_current_modes():  # a real host tensor, also under FakeTensorMode
                return torch.tensor(self.host_value(src), dtype=dtype).reshape(src.shape)
        return None

    def _count(self, func, name, args, kwargs, out) -> None:
        if name in ALLOCATIONS:
            return
        written_args: list[torch.Tensor] = []
        read_args: list[torch.Tensor] = []
        schema_args = func._schema.arguments
        bound = list(zip(schema_args, args)) + [(a, kwargs[a.name]) for a in schema_args if a.name in kwargs]
        for arg, value in bound:
            tensors = _tensors(value)
            # fused Adam declares its grads mutable (it may unscale them); it only reads them here
            mutated = arg.alias_info is not None and arg.alias_info.is_write and arg.name != "grads"
            if mutated:
                written_args += tensors
                overwritten = arg.name == "self" and (name in OVERWRITES or name in SCATTERS)
                if arg.kwarg_only or overwritten:
                    continue
            read_args += tensors
        if (not written_args and func.is_view) or self._is_alias(out, args, kwargs, written_args):
            return
        fresh = [t for t in _tensors(out) if not any(t is w for w in written_args)]
        read = sum(distinct_bytes(t) for t in read_args)
        written = sum(distinct_bytes(t) for t in fresh)
        if name in SCATTERS:
            rows = _scatter_bytes(name, args)
            written += rows
            read += rows if name in ADDING_SCATTERS else 0
        else:
            written += sum(distinct_bytes(t) for t in written_args)
        if name in GATHERS:
            read += written - distinct_bytes(args[0])
        if name.startswith(("_foreach_", "_fused_")):
            lists = [v for v in list(args) + list(kwargs.values())
                     if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)]
            launches = multi_tensor_launches(lists)
        else:
            launches = 1 if read or written else 0
        category = "gemm" if name in GEMM_OPS else "other"
        if any(_storage(t) in self.grad_storages for t in written_args):
            category = "comm"
        self._add(category, name, read=read, written=written, launches=launches)

    @staticmethod
    def _is_alias(out, args, kwargs, written_args) -> bool:
        """An op that only returns views of its inputs (reshape, split, detach, ...): no traffic."""
        if written_args:
            return False
        outs = _tensors(out)
        if not outs:
            return False
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        return all(_storage(t) in inputs for t in outs)

    def _add(self, category: str, name: str, *, read: int, written: int, launches: int) -> None:
        c = self.counts[(self._current_phase(), category, name)]
        c.calls += 1
        c.read += read
        c.written += written
        c.launches += launches
