"""Flat parameter and fp32 main-gradient buffers, their buckets and ZeRO-1 shards, and THE rule
deciding which group reduces which gradient (``grad_reduction``).

Every trainable parameter lives in exactly one ``GradBuffer``, chosen by (parameter dtype,
reduction group): one buffer for the dense parameters (reduced over DP; with sequence
parallelism a second one for the TP-replicated ones, reduced over DP x TP; at PP > 1 one for a
tied embedding, reduced over the first and last stage's DP groups) and one per EP size for the
expert parameters (reduced over that EP size's EDP group), all within the rank's pipeline stage.
Layout of one buffer::

    data       [N] param dtype  every param.data is a view into it (so one bucket = one collective)
    main_grad  [N] fp32         every param.main_grad is a view into it
    params     reverse registration order (roughly backward order, so early buckets fill first),
               each starting at a multiple of PARAM_ALIGNMENT elements
    buckets    consecutive ranges of whole params, closed once they hold >= bucket_size elements;
               with ZeRO-1 each is padded to a multiple of the group size S and rank r owns
               [start + r * len / S, start + (r + 1) * len / S) of it (its "shard");
               without ZeRO-1 a rank owns every bucket whole.

A post-accumulate-grad hook adds each ``param.grad`` (param dtype) into ``param.main_grad``
(fp32) and frees ``param.grad``, so micro-batches accumulate in fp32; it does no host sync.
``zero_grad`` does not write the buffer: the first gradient of a parameter after it is copied
into the main grad, later ones are added (``0 + g`` is ``g``, so the sums are the same bits), and
a parameter that got no gradient is zeroed when its bucket is reduced.  That saves a pass that
writes and one that reads every main grad per step.
``start_bucket_sync`` launches one asynchronous collective per bucket and ``finish_grad_sync``
waits for them.  By default all run from ``step``; with --overlap-grad-reduce the hook reports
each ready gradient to ``megamoe.optim.grad_sync``, which launches buckets during backward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.parallel.mappings import flat_collective
from megamoe.parallel.params import ParamMeta, param_meta
from megamoe.parallel.state import ParallelState

# 64 elements keep every parameter's start 128-byte aligned in bf16 (256 in fp32): grouped GEMMs
# and vectorised kernels need aligned base addresses, and params are views into one buffer.
PARAM_ALIGNMENT = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Reduction:
    """How one parameter's gradient is reduced: multiply by ``scale``, then sum over ``group``."""

    name: str  # "dp", "dp+tp", "dp+emb" or "edp(ep=E)": names the buffer and the bench's collective groups
    group: dist.ProcessGroup
    size: int
    rank: int  # this rank's index in ``group``
    scale: float


def grad_reduction(meta: ParamMeta, state: ParallelState) -> Reduction:
    """THE gradient-reduction rule (derived in docs/gradient-rules.md): after it every gradient
    equals the gradient of the global-batch mean loss (each DP rank's loss is the mean over its
    micro-batch; DP = world / TP).

    Dense parameter: summed over the DP group, divided by DP.  A TP-replicated one (norms, the
    router, row-parallel biases, position embeddings) has the same, whole gradient on every TP
    rank, as its computation is replicated over TP.
    With sequence parallelism a TP-replicated parameter sees only its TP rank's part of the
    sequence, so its gradient is partial over TP: it is summed over DP x TP (its pipeline stage's
    ranks), still divided by DP.  This is the only place it is completed.
    The tied input embedding / output weight at PP > 1 (``ParamMeta.pipeline_tied``) is held by
    the first stage (the input embedding's gradient) and the last (the output layer's): summed
    over the first and the last stage's DP groups together (``embedding_dp_group``, one
    collective; with ZeRO-1 sharded over those 2 x DP ranks, so each element is owned once),
    divided by DP, which gives both copies PP 1's gradient of the one tied weight.
    Expert parameter of EP size E: summed over its EDP group (the world / (E x ETP) ranks holding
    the same expert shards), divided by DP -- *not* by EDP.  Through the all-to-all backward (and
    with sequence parallelism the ETP gather) an expert's local gradient already sums the tokens
    of its whole EP x ETP block of ranks, so the EDP sum covers every token once, exactly like the
    dense sum; dividing by EDP would make expert gradients too large by EP x ETP / TP (the bug
    DeepSpeed PR 5259 fixed).  An ETP-replicated expert bias is made whole over ETP in the
    forward's ``copy_to_group``.
    The scale is applied before the sum; each rank's loss is already a mean over its tokens.
    """
    scale = 1.0 / state.dp_size
    if meta.is_expert:
        groups = state.experts(meta.expert_parallel_size)
        return Reduction(f"edp(ep={groups.ep_size})", groups.edp_group, groups.edp_size, groups.edp_rank, scale)
    if meta.pipeline_tied and state.pp_size > 1:
        ranks = state.embedding_dp_ranks
        return Reduction("dp+emb", state.embedding_dp_group, len(ranks), ranks.index(state.rank), scale)
    if meta.tensor_parallel_dim is None and state.sequence_parallel:
        return Reduction("dp+tp", state.stage_group, state.stage_size, state.stage_rank, scale)
    return Reduction("dp", state.dp_group, state.dp_size, state.dp_rank, scale)


def reduction_names(state: ParallelState) -> list[str]:
    """The names ``grad_reduction`` may give a parameter of any stage of ``state``'s layout, in
    one order shared by every rank (the grad norm's parts: at PP > 1 stages hold different
    buffers, and the norm's table must line up)."""
    names = ["dp"] + (["dp+tp"] if state.sequence_parallel else []) + (["dp+emb"] if state.pp_size > 1 else [])
    return names + [f"edp(ep={ep})" for ep in sorted(set(state.ep_by_layer.values()))]


def replica_rank(meta: ParamMeta, state: ParallelState) -> int:
    """This rank's index among the ranks outside a parameter's reduction group that hold the same
    reduced gradient (only copy 0 counts in the grad norm): every TP rank for a TP-replicated
    parameter reduced over DP only, every ETP rank for an ETP-replicated expert parameter."""
    if meta.tensor_parallel_dim is not None:
        return 0
    if meta.is_expert:
        return state.experts(meta.expert_parallel_size).etp_rank
    return 0 if state.sequence_parallel else state.tp_rank


@dataclass
class ParamRange:
    name: str
    param: nn.Parameter
    start: int  # [start, end) in the buffer
    end: int


@dataclass
class Bucket:
    start: int  # [start, end) in the buffer; end - start is a multiple of the shard count
    end: int
    shard_start: int  # [shard_start, shard_end): this rank's shard (the whole bucket without ZeRO-1)
    shard_end: int
    local_start: int  # where this shard starts in the concatenation of this rank's shards
    params: list[ParamRange]


@dataclass
class Piece:
    """The part of one parameter inside this rank's shard of one bucket (the whole param without ZeRO-1)."""

    name: str
    param: nn.Parameter
    param_start: int  # [param_start, param_end) of param.view(-1)
    param_end: int
    buffer_start: int  # the same elements in the buffer
    buffer_end: int
    local_start: int  # and in the concatenation of this rank's shards

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


def _accumulate_into_main_grad(param: torch.Tensor, first: bool) -> None:
    # fp32 accumulation over micro-batches; freeing .grad keeps at most one low-precision
    # gradient per parameter alive.  No collective, no host sync: this is the backward hot path.
    if first:
        param.main_grad.copy_(param.grad)
    else:
        param.main_grad.add_(param.grad)
    param.grad = None


class GradBuffer:
    """The parameters of one (dtype, reduction group), packed as described in the module docstring.

    ``named_params`` in the order they are packed; all of one dtype and device, all reduced by
    ``reduction``.  With ``sharded`` (ZeRO-1) each bucket is reduce-scattered over the group and
    its updated parameters all-gathered; otherwise each bucket is all-reduced.
    """

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        reduction: Reduction,
        *,
        bucket_size: int,
        sharded: bool,
        grad_reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        assert named_params, "a buffer needs at least one parameter"
        dtypes = {p.dtype for _, p in named_params}
        devices = {p.device for _, p in named_params}
        assert len(dtypes) == 1 and len(devices) == 1, (dtypes, devices)
        self.reduction = reduction
        self.sharded = sharded
        self.grad_reduce_dtype = grad_reduce_dtype
        self.shard_count = reduction.size if sharded else 1
        self.buckets, numel = self._layout(named_params, bucket_size)
        device = devices.pop()
        self.data = torch.zeros(numel, dtype=dtypes.pop(), device=device)
        self.main_grad = torch.zeros(numel, dtype=torch.float32, device=device)
        # Called as on_param_ready(buffer, bucket_index) after each gradient is accumulated;
        # megamoe.optim.grad_sync sets it to overlap the reduction with backward.
        self.on_param_ready = None
        for index, bucket in enumerate(self.buckets):
            for r in bucket.params:
                p = r.param
                self.data[r.start : r.end].copy_(p.detach().reshape(-1))
                p.data = self.data[r.start : r.end].view(p.shape)
                p.main_grad = self.main_grad[r.start : r.end].view(p.shape)
                p.register_post_accumulate_grad_hook(self._grad_hook(index))
        self._pending: list = []  # (bucket, comm, handle) in launch order
        self._started: set[int] = set()  # bucket indices launched since the last zero_grad
        self._synced = False  # main grads hold the reduced gradients (until zero_grad)
        # ids of the params whose main grad holds this step's gradient (all: it starts at zero)
        self._written: set[int] = {id(r.param) for b in self.buckets for r in b.params}

    def _grad_hook(self, bucket_index: int):
        # A weak reference: a parameter's hooks are not traversed by Python's garbage collector,
        # so a strong one (parameter -> hook -> buffer -> parameter) would keep the buffer, its
        # fp32 gradients and its process groups alive after the model and optimizer are dropped.
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            buffer = owner()
            first = buffer is not None and id(param) not in buffer._written
            _accumulate_into_main_grad(param, first)
            if first:
                buffer._written.add(id(param))
            if buffer is not None and buffer.on_param_ready is not None:
                buffer.on_param_ready(buffer, bucket_index)

        return hook

    def _layout(self, named_params, bucket_size: int) -> tuple[list[Bucket], int]:
        buckets: list[Bucket] = []
        current: list[ParamRange] = []
        bucket_start = offset = 0

        def close() -> int:
            length = _round_up(offset - bucket_start, self.shard_count)
            shard = length // self.shard_count
            shard_start = bucket_start + self.reduction.rank * shard if self.sharded else bucket_start
            local_start = sum(b.shard_end - b.shard_start for b in buckets)
            buckets.append(
                Bucket(bucket_start, bucket_start + length, shard_start, shard_start + shard, local_start, current)
            )
            return bucket_start + length

        for name, p in named_params:
            start = _round_up(offset, PARAM_ALIGNMENT)
            if not current:
                bucket_start = start
            current.append(ParamRange(name, p, start, start + p.numel()))
            offset = start + p.numel()
            if offset - bucket_start >= bucket_size:
                offset = close()
                current = []
        if current:
            offset = close()
        return buckets, offset

    # ------------------------------------------------------------------ ownership
    def pieces(self) -> list[Piece]:
        """Every (param, range) inside this rank's shards, in buffer order."""
        out = []
        for b in self.buckets:
            for r in b.params:
                lo, hi = max(r.start, b.shard_start), min(r.end, b.shard_end)
                if lo < hi:
                    out.append(Piece(r.name, r.param, lo - r.start, hi - r.start, lo, hi, b.local_start + lo - b.shard_start))
        return out

    @property
    def local_numel(self) -> int:
        """Elements of this rank's shards, padding included (the fp32 master's size)."""
        return sum(b.shard_end - b.shard_start for b in self.buckets)

    def shard_grads(self) -> list[torch.Tensor]:
        """This rank's shard of the main grad of every bucket (valid after ``finish_grad_sync``)."""
        return [self.main_grad[b.shard_start : b.shard_end] for b in self.buckets]

    # ------------------------------------------------------------------ gradients
    def zero_grad(self) -> None:
        """Start a new step: every main grad counts as zero (see the module docstring)."""
        assert not self._pending, "zero_grad while a gradient reduction is in flight"
        self._written = set()
        self._started = set()
        self._synced = False

    def start_bucket_sync(self, index: int) -> None:
        """Launch bucket ``index``'s reduction: scale, then all-reduce (or reduce-scatter into this
        rank's shard with ZeRO-1) over the reduction group, in ``grad_reduce_dtype``."""
        assert index not in self._started and not self._synced, "bucket reduced twice since zero_grad"
        self._started.add(index)
        b = self.buckets[index]
        for r in b.params:
            if id(r.param) not in self._written:  # no gradient this step
                self.main_grad[r.start : r.end].zero_()
        red = self.reduction
        grad = self.main_grad[b.start : b.end]
        # x * 1.0 is x: at DP 1 the scale would cost a pass over the bucket and change nothing
        if self.grad_reduce_dtype == torch.float32:
            comm = grad if red.scale == 1.0 else grad.mul_(red.scale)
        else:
            comm = (grad if red.scale == 1.0 else grad * red.scale).to(self.grad_reduce_dtype)
        handle = None
        if red.size > 1:
            if self.sharded:
                shard = comm[b.shard_start - b.start : b.shard_end - b.start]
                reduce_scatter = flat_collective("reduce_scatter_single", "reduce_scatter_tensor")
                handle = reduce_scatter(shard, comm, group=red.group, async_op=True)
            else:
                handle = dist.all_reduce(comm, group=red.group, async_op=True)
        self._pending.append((b, comm, handle))

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet, in bucket order."""
        for index in range(len(self.buckets)):
            if index not in self._started:
                self.start_bucket_sync(index)

    def finish_grad_sync(self) -> None:
        """Wait for the reductions (starting those not started); afterwards every shard grad holds
        the reduced gradient in fp32.  Idempotent until the next ``zero_grad``."""
        if self._synced:
            return
        self.start_grad_sync()
        for b, comm, handle in self._pending:
            if handle is not None:
                handle.wait()
            if comm.dtype != torch.float32:
                rel = slice(b.shard_start - b.start, b.shard_end - b.start)
                self.main_grad[b.shard_start : b.shard_end].copy_(comm[rel])
        self._pending = []
        self._synced = True

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def copy_to_params(self, master: torch.Tensor) -> None:
        """Write this rank's shards from ``master`` (fp32, ``local_numel``), then all-gather each
        bucket's shards over the reduction group (ZeRO-1) so every rank holds the full params."""
        assert master.numel() == self.local_numel
        for b in self.buckets:
            length = b.shard_end - b.shard_start
            self.data[b.shard_start : b.shard_end].copy_(master[b.local_start : b.local_start + length])
        if not self.sharded or self.reduction.size == 1:
            return
        all_gather = flat_collective("all_gather_single", "all_gather_into_tensor")
        handles = [
            all_gather(self.data[b.start : b.end], self.data[b.shard_start : b.shard_end], group=self.reduction.group, async_op=True)
            for b in self.buckets
        ]
        for h in handles:
            h.wait()

    def shard_params(self) -> torch.Tensor:
        """This rank's shards of the parameter data, concatenated, as fp32 (the master's initial value)."""
        return torch.cat([self.data[b.shard_start : b.shard_end].float() for b in self.buckets])


def build_grad_buffers(
    model: nn.Module,
    state: ParallelState,
    *,
    bucket_size: int,
    sharded: bool,
    grad_reduce_dtype: torch.dtype = torch.float32,
) -> list[GradBuffer]:
    """One buffer per (param dtype, reduction group) over the trainable params of ``model``,
    params in reverse registration order.  Every rank of a reduction group builds the same
    layout because it holds the same parameter shapes.  Runs no collective: the checkpoint tools
    build it on the meta device with a group-less ``ParallelState`` to learn who owns what."""
    groups: dict[tuple, tuple[Reduction, list]] = {}
    for name, p in reversed(list(model.named_parameters())):
        if not p.requires_grad:
            continue
        reduction = grad_reduction(param_meta(p), state)
        groups.setdefault((p.dtype, reduction.name), (reduction, []))[1].append((name, p))
    return [
        GradBuffer(params, reduction, bucket_size=bucket_size, sharded=sharded, grad_reduce_dtype=grad_reduce_dtype)
        for reduction, params in groups.values()
    ]
