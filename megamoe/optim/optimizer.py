"""MixedPrecisionOptimizer: fp32 main grads and master weights, EP-aware ZeRO-1, one grad norm.

Usage (the trainer's step)::

    opt = MixedPrecisionOptimizer(model, OptimizerConfig(...), layout)   # params already initialised
    opt.zero_grad()
    for micro_batch in micro_batches:
        opt.scale_loss(model(...).loss / len(micro_batches)).backward()
    result = opt.step()          # StepResult(grad_norm, grad_norm_inf, skipped, loss_scale, num_skipped_total)

``step``:
  1. ``finish_grad_sync``: reduce every bucket (``grad_buffer.grad_reduction`` decides the group
     and the 1/DP scale); with ZeRO-1 a reduce-scatter leaves each rank its shard.  With
     ``overlap_grad_reduce`` most buckets were already launched during the last backward
     (``grad_sync``); earlier micro-batches run in ``no_sync()``.
  2. unscale this rank's shard of the fp32 main grads by ``1 / loss_scale`` (fp16).
  3. ``grad_norm.global_grad_norm``: L2 and inf norms with one world collective (the step's one
     host sync), which also tells every rank which ranks hold a non-finite gradient (any of
     theirs, normed there or not) or loss; a non-finite gradient anywhere means every rank skips
     the step and the loss scaler backs off (the trainer stops instead unless fp16).
  4. clip by ``clip_grad / (norm + 1e-6)`` when that is below 1: inside torch's fused AdamW,
     through its ``grad_scale``, where ``adam.fused_adamw_support`` found that this works on the
     device; else a pass over the shard grads.
  5. AdamW on the fp32 master shards (params grouped by (weight decay, EP size)).
  6. copy the master shards into the model params (cast to their dtype) and, with ZeRO-1,
     all-gather each bucket in the group that reduced it.

Without ZeRO-1 every rank owns every bucket whole: the same code with a shard group of size 1,
the same numbers.  Optimizer state per rank: fp32 master (4 B) + Adam m and v (8 B) per owned
parameter element, + 4 B per padding element of the owned shards (padding has no m, v).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.optim.adam import build_adam
from megamoe.optim.config import OptimizerConfig, PARAMS_DTYPES
from megamoe.optim.grad_buffer import build_grad_buffers, reduction_names
from megamoe.optim.grad_norm import GradNorm, counts_toward_norm, global_grad_norm
from megamoe.optim.grad_sync import OverlappedGradSync
from megamoe.optim.loss_scaler import LossScaler
from megamoe.optim.state_dict import check_and_load, optimizer_state_dict
from megamoe.parallel.params import param_meta
from megamoe.parallel.state import ParallelState


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm after unscaling, before clipping (non-finite when skipped)
    grad_norm_inf: float  # global max |g|, same point
    skipped: bool  # non-finite gradients somewhere: no parameter changed on any rank
    loss_scale: float  # the scale the next scale_loss applies (after this step's update)
    num_skipped_total: int  # skipped steps since construction (or restored from a checkpoint)
    nonfinite_grad_ranks: tuple[int, ...] = ()  # ranks that held a NaN/inf gradient (the same on every rank)
    nonfinite_loss_ranks: tuple[int, ...] = ()  # ranks whose ``step(loss=)`` was NaN/inf


@dataclass
class MasterPiece:
    """One optimizer tensor: the fp32 master of a parameter's elements ``[start, end)`` (of its
    flattened local tensor) that this rank owns; ``.grad`` views the matching main grads."""

    name: str
    start: int
    end: int
    master: torch.Tensor
    part: str  # the reduction group of its buffer: "dp" or "edp(ep=E)"


class MixedPrecisionOptimizer:
    def __init__(self, model: nn.Module, cfg: OptimizerConfig, layout: ParallelState) -> None:
        """``layout``: the rank's layout (with its process groups) the model was built for; every
        collective of the optimizer runs over its groups."""
        self.cfg = cfg
        self.state = layout
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"the model's parameters are on several devices {sorted(map(str, devices))}: use one")
        self.device = devices.pop()  # every collective of the step runs on it, on every rank
        for name, p in named:
            if hasattr(p, "main_grad"):
                raise ValueError(f"parameter {name} already belongs to a MixedPrecisionOptimizer (one per model)")
            if p.dtype != cfg.params_dtype:
                raise ValueError(
                    f"parameter {name} is {p.dtype} but the optimizer expects {cfg.params_dtype} "
                    f"({PARAMS_DTYPES[cfg.params_dtype]}): build the model with the same precision flag"
                )
        self.buffers = build_grad_buffers(
            model,
            self.state,
            bucket_size=cfg.bucket_size,
            sharded=cfg.use_distributed_optimizer,
            grad_reduce_dtype=cfg.grad_reduce_dtype,
        )
        self.masters = [buf.shard_params() for buf in self.buffers]
        self.grad_sync = OverlappedGradSync(self.buffers) if cfg.overlap_grad_reduce else None
        self.pieces: list[MasterPiece] = []
        groups: dict[tuple[bool, int], list[torch.Tensor]] = {}
        # The master views each norm counts (``counts_toward_norm``), by reduction group: their
        # ``.grad`` for the grad norm, themselves for params_norm().
        # The same keys in the same order on every rank (``reduction_names``), whatever buffers its
        # pipeline stage holds.
        self._norm_masters: dict[str, list[torch.Tensor]] = {name: [] for name in reduction_names(self.state)}
        self._norm_masters.update({buf.reduction.name: [] for buf in self.buffers
                                   if buf.reduction.name not in self._norm_masters})
        self._unnormed_grads: list[torch.Tensor] = []
        for buf, master in zip(self.buffers, self.masters):
            for piece in buf.pieces():
                meta = param_meta(piece.param)
                view = master[piece.local_start : piece.local_start + piece.numel]
                view.grad = buf.main_grad[piece.buffer_start : piece.buffer_end]
                self.pieces.append(MasterPiece(piece.name, piece.param_start, piece.param_end, view, buf.reduction.name))
                groups.setdefault((meta.weight_decay, meta.expert_parallel_size or 0), []).append(view)
                if counts_toward_norm(meta, buf.reduction, sharded=buf.sharded, state=self.state):
                    self._norm_masters[buf.reduction.name].append(view)
                else:
                    # Applied here but normed elsewhere: still checked here for NaN/inf.
                    self._unnormed_grads.append(view.grad)
        self._norm_grads = {name: [view.grad for view in views] for name, views in self._norm_masters.items()}
        self.group_keys = sorted(groups)
        param_groups = [
            {"params": groups[key], "weight_decay": cfg.weight_decay if key[0] else 0.0} for key in self.group_keys
        ]
        # A ZeRO-1 rank may own only padding (tiny models, large groups): it then runs no Adam.
        adam = build_adam(param_groups, cfg, self.device) if param_groups else None
        self.optimizer = adam.optimizer if adam else None
        self.adam_kind = adam.kind if adam else "none (no owned elements)"
        # Clip inside Adam (no pass of its own over the main grads) where the probe showed it works.
        self.clip_in_adam = adam is not None and adam.applies_grad_scale
        self.scaler = LossScaler.from_config(cfg)
        self.lr = cfg.lr
        self.adam_steps = 0
        self.num_skipped = 0
        self.last_norm: GradNorm | None = None  # the last step's norm, with its dense / per-EP-size parts

    # ------------------------------------------------------------------ the step
    def zero_grad(self) -> None:
        """Zero the fp32 main grads (once per optimizer step, before the first micro-batch)."""
        for buf in self.buffers:
            buf.zero_grad()
        if self.grad_sync is not None:
            self.grad_sync.reset()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` with loss scaling (fp16, or a static --loss-scale), else ``loss``."""
        return loss * self.scaler.scale if self.scaler.scale != 1.0 else loss

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside this block only accumulates: wrap every micro-batch but the last.
        Needed with ``overlap_grad_reduce`` (the last one's backward launches the reduction);
        harmless without it."""
        if self.grad_sync is None:
            yield
            return
        self.grad_sync.enabled = False
        try:
            yield
        finally:
            self.grad_sync.enabled = True

    def finish_grad_sync(self) -> None:
        """Reduce every bucket's main grads (see ``grad_buffer.grad_reduction``), launching, in
        the order every rank shares, the buckets backward has not launched."""
        if self.grad_sync is not None:
            self.grad_sync.launch_remaining()
        for buf in self.buffers:
            buf.finish_grad_sync()

    @torch.no_grad()
    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        """Reduce, norm, clip and apply one step; skipped on every rank when any rank holds a
        non-finite gradient.  ``loss``: this rank's loss of the step, checked for NaN/inf in the
        norm's collective (``StepResult.nonfinite_loss_ranks``); it does not decide the skip."""
        self.finish_grad_sync()
        shard_grads = [g for buf in self.buffers for g in buf.shard_grads()]
        if self.scaler.scale != 1.0:
            for g in shard_grads:
                g.mul_(1.0 / self.scaler.scale)
        norm = self.last_norm = global_grad_norm(self._norm_grads, self.state.world_group, device=self.device,
                                                 uncounted=self._unnormed_grads, loss=loss)
        skipped = not norm.finite
        self.scaler.update(skipped)
        if skipped:
            self.num_skipped += 1
        else:
            coeff = self.cfg.clip_grad / (norm.l2 + 1e-6) if self.cfg.clip_grad > 0 else 1.0
            if coeff < 1.0 and not self.clip_in_adam:
                for g in shard_grads:
                    g.mul_(coeff)
            if self.optimizer is not None:
                if coeff < 1.0 and self.clip_in_adam:
                    # torch's fused AdamW divides each gradient by grad_scale as it reads it: the
                    # clipping costs no pass of its own over the main grads (which stay unclipped).
                    self.optimizer.grad_scale = torch.tensor(1.0 / coeff, device=self.device)
                self.optimizer.step()
                self.optimizer.grad_scale = None
            self.adam_steps += 1
            self._copy_masters_to_params()
        return StepResult(
            grad_norm=norm.l2,
            grad_norm_inf=norm.inf,
            skipped=skipped,
            loss_scale=self.scaler.scale,
            num_skipped_total=self.num_skipped,
            nonfinite_grad_ranks=norm.nonfinite_grad_ranks,
            nonfinite_loss_ranks=norm.nonfinite_loss_ranks,
        )

    @torch.no_grad()
    def params_norm(self) -> float:
        """The L2 norm of the whole model's fp32 master weights, each element counted once (the
        grad norm's rule and function); the same on every rank.  Collective over the world."""
        return global_grad_norm(self._norm_masters, self.state.world_group, device=self.device).l2

    def num_zeros_in_grad(self) -> int:
        """How many elements of the whole model's last reduced gradient are exactly zero, each
        element counted once (the grad norm's ownership rule); the same on every rank.  Read
        after ``step`` and before the next ``zero_grad``.  Collective over the world."""
        zeros = torch.zeros((), dtype=torch.int64, device=self.device)
        for grads in self._norm_grads.values():
            for grad in grads:
                zeros += grad.numel() - torch.count_nonzero(grad)
        dist.all_reduce(zeros, group=self.state.world_group)
        return int(zeros.item())

    def _copy_masters_to_params(self) -> None:
        for buf, master in zip(self.buffers, self.masters):
            buf.copy_to_params(master)

    def set_lr(self, lr: float) -> None:
        """Learning rate of every param group."""
        self.lr = lr
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    # ------------------------------------------------------------------ state
    def adam_state(self, piece: MasterPiece) -> dict[str, torch.Tensor]:
        """The Adam moments of one piece (zeros before the first step)."""
        state = self.optimizer.state.get(piece.master, {}) if self.optimizer is not None else {}
        return {k: state.get(k, torch.zeros_like(piece.master)) for k in ("exp_avg", "exp_avg_sq")}

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state: plain tensors and Python values only."""
        return optimizer_state_dict(self)

    def load_state_dict(self, sd: dict) -> None:
        """Restore ``state_dict()`` output of this rank (``ValueError`` if its owned ranges are not
        this rank's), then copy the masters into the model's parameters."""
        check_and_load(self, sd)
        self._copy_masters_to_params()

    def memory_stats(self) -> dict[str, dict[str, int]]:
        """Per part ("dp", "edp(ep=E)"): owned parameter elements, shard elements (with padding)
        and the bytes of the fp32 master and Adam moments actually allocated on this rank."""
        out = {}
        for buf, master in zip(self.buffers, self.masters):
            part = out.setdefault(
                buf.reduction.name, {"owned_numel": 0, "shard_numel": 0, "master_bytes": 0, "adam_bytes": 0}
            )
            part["shard_numel"] += buf.local_numel
            part["master_bytes"] += master.numel() * master.element_size()
        for piece in self.pieces:
            part = out[piece.part]
            part["owned_numel"] += piece.end - piece.start
            state = self.optimizer.state.get(piece.master, {}) if self.optimizer is not None else {}
            part["adam_bytes"] += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
        return out
