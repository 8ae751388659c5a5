"""The pipeline schedules (PP > 1): one step's micro-batches through this rank's stage.

``PipelineSchedule(model, optimizer, ...)`` wraps each of the rank's model chunks
(``layout.model_chunks``: one for 1F1B, V for the interleaved schedule) in a
``torch.distributed.pipelining.PipelineStage`` over the PP group, pipeline chunk ``v * P +
pp_rank``, and runs them with ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``; ``train_step``
and ``evaluate`` (``megamoe.training.trainer``) call ``forward_backward`` / ``forward_only``.

What megamoe adds around torch's schedules, so that a step is PP 1's:

* Scaling: the schedule's own ``scale_grads`` is off.  The last stage's loss function returns
  ``loss_scale x (lm + mtp_loss_scaling_factor x mtp + its MTP depths' aux) / M`` (M
  micro-batches), as PP 1's ``scale_loss(loss / M)``.
* MoE aux and z losses live on every stage, but only the last stage has a loss to call backward
  on.  Each chunk's aux losses (already times their coefficients) are attached to its output by
  ``_AddAuxGrad``: the identity forward, and a backward that gives the aux losses the gradient
  ``loss_scale / M``, what they get at PP 1 as part of ``(lm + aux) x loss_scale / M``.
* The micro-batches' MoE stats are recorded per chunk, in forward order (the micro-batch order),
  so the trainer gets PP 1's ``step_moe_stats`` for this rank's MoE layers: the expert-bias update
  then sums every micro-batch's loads over the stage (``balancing.update_expert_biases``).
* ``--overlap-grad-reduce``: the gradient reduction launches its buckets during the backward of
  each chunk's last micro-batch; every other backward only accumulates.  Each chunk's output
  (and on the last chunk the loss) carries ``_BeforeBackward``, whose backward runs first in
  that chunk's backward and sets ``grad_sync.enabled`` for it.
* Inputs: the first stage's are the tokens ``[M x b, s]``; the labels, the loss mask and the
  tokens (for the MTP depths, on the last stage with a copy of the input embedding) travel to
  the last stage as the schedule's target ``[M x b, 3, s]`` (fp64: exact for all three).
  Between stages the hidden states are ``[b, s, h]`` (``[b, s / TP, h]`` with sequence
  parallelism) in the parameters' dtype.

Why torch's schedules rather than megamoe's own: they run 1F1B and interleaved 1F1B over a
process subgroup with gloo and NCCL, and the three things megamoe needs around them (scaling,
aux losses of stages without a loss, the overlap of the last backward) fit as autograd functions
on the chunks' outputs and a loss function, without touching the schedule's order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from megamoe.model.gpt import GPTOutput


class _AddAuxGrad(torch.autograd.Function):
    """``x`` unchanged; backward also sends ``scale`` to ``aux`` (a scalar loss), as if it had
    been added to the loss that is back-propagated with that scale."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


class _BeforeBackward(torch.autograd.Function):
    """``x`` unchanged; ``hook()`` runs when the backward reaches it (first, on a chunk's output)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None


class _Chunk(nn.Module):
    """Model chunk ``index`` of the rank's stage as the pipeline stage's module: hidden states (or
    the tokens) in, hidden states out; records its MoE stats and attaches its aux losses."""

    def __init__(self, model, index: int, runner: "PipelineSchedule") -> None:
        super().__init__()
        self.index = index
        self.runner = runner
        self.stage_model = [model]  # not a submodule: the parameters stay the GPTModel's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runner = self.runner
        out, auxes = self.stage_model[0].run_chunk(self.index, x)
        # Sent to the next stage as it is, and torch's p2p sends need a contiguous tensor: with
        # sequence parallelism and micro-batches above 1 the stage's [b, s / TP, h] is a strided slice.
        out = out.contiguous()
        micro_batch = len(runner.stats[self.index])
        runner.stats[self.index].append([aux.stats for aux in auxes])
        if not runner.training:
            return out
        if auxes:
            aux = torch.stack([a.loss for a in auxes]).sum() if len(auxes) > 1 else auxes[0].loss
            runner.aux_losses[self.index].append(aux.detach())
            out = _AddAuxGrad.apply(out, aux, runner.grad_scale)
        return _BeforeBackward.apply(out, runner.sync_hook(micro_batch))


class PipelineSchedule:
    """The rank's pipeline stages and their schedule (1F1B for one model chunk, interleaved 1F1B
    for several), for ``num_microbatches`` micro-batches of ``[micro_batch_size, seq_length]``.
    Built once, after the optimizer (its loss scale and gradient sync are read every step)."""

    def __init__(self, model, optimizer, *, num_microbatches: int, micro_batch_size: int, seq_length: int,
                 device: torch.device) -> None:
        layout = model.layout
        self.model = model
        self.optimizer = optimizer
        self.num_microbatches = num_microbatches
        self.training = True
        self.grad_scale = 1.0
        self._reset()
        pp, chunks = layout.pp_size, layout.virtual_size
        seq = seq_length // layout.tp_size if layout.sequence_parallel else seq_length
        # requires_grad: the stages read from their examples which activations have a gradient to send back
        hidden = torch.empty(micro_batch_size, seq, model.config.hidden_size, dtype=model.execution.params_dtype,
                             device=device, requires_grad=True)
        tokens = torch.empty(micro_batch_size, seq_length, dtype=torch.long, device=device)
        self.stages = []
        for v in range(chunks):
            index = v * pp + layout.pp_rank
            self.stages.append(PipelineStage(
                _Chunk(model, v, self), index, pp * chunks, device, input_args=tokens if index == 0 else hidden,
                output_args=hidden, group=layout.pp_group))
        self.first = layout.is_first_stage
        self.last = layout.is_last_stage
        if chunks == 1:
            self.schedule = Schedule1F1B(self.stages[0], num_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, num_microbatches, loss_fn=self._loss,
                                                    scale_grads=False)

    def _reset(self) -> None:
        chunks = self.model.layout.virtual_size
        self.stats: list[list] = [[] for _ in range(chunks)]
        self.aux_losses: list[list] = [[] for _ in range(chunks)]
        self.lm_losses: list[torch.Tensor] = []
        self.head_outputs: list[tuple] = []  # per micro-batch: MTP loss, MTP aux losses and stats

    def sync_hook(self, micro_batch: int):
        """What a chunk's backward of ``micro_batch`` runs first: with --overlap-grad-reduce, let
        only the last micro-batch's backward launch the gradient reduction."""
        sync = self.optimizer.grad_sync
        last = micro_batch == self.num_microbatches - 1

        def hook() -> None:
            if sync is not None:
                sync.enabled = last

        return hook

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: ``target`` ``[b, 3, s]`` holds its labels, loss
        mask and tokens."""
        lm, mtp, auxes = self.model.head_losses(hidden, target[:, 2].long(), target[:, 0].long(), target[:, 1])
        self.lm_losses.append(lm.detach())
        self.head_outputs.append((mtp.detach() if mtp is not None else None,
                                  [aux.loss.detach() for aux in auxes], [aux.stats for aux in auxes]))
        if not self.training:
            return lm
        aux_total = torch.zeros((), dtype=torch.float32, device=lm.device)
        for aux in auxes:
            aux_total = aux_total + aux.loss
        # PP 1's formula (GPTOutput.loss) for what this stage back-propagates: its LM loss, the MTP
        # depths' aux losses and the scaled MTP loss; the layers' aux losses enter by _AddAuxGrad.
        head = GPTOutput(lm_loss=lm, aux_loss=aux_total, logits=None, mtp_loss=mtp,
                         mtp_loss_scaling_factor=self.model.config.mtp_loss_scaling_factor)
        loss = self.optimizer.scale_loss(head.loss / self.num_microbatches)
        return _BeforeBackward.apply(loss, self.sync_hook(len(self.lm_losses) - 1))

    def _run(self, batches: list[dict], train: bool) -> None:
        self._reset()
        self.training = train
        tokens = torch.cat([b["tokens"] for b in batches]) if self.first else None
        # fp64 holds the token ids exactly (below 2^53) and the mask's fp32 values
        target = (torch.cat([torch.stack([b["labels"].double(), b["loss_mask"].double(), b["tokens"].double()], dim=1)
                             for b in batches]) if self.last else None)
        args = (tokens,) if self.first else ()
        kwargs = dict(target=target, losses=[]) if self.last else {}
        if train:
            self.grad_scale = self.optimizer.scaler.scale / self.num_microbatches
            try:
                self.schedule.step(*args, **kwargs)
            finally:
                if self.optimizer.grad_sync is not None:
                    self.optimizer.grad_sync.enabled = True
        else:
            self.schedule.eval(*args, **kwargs)

    def forward_backward(self, batches: list[dict]) -> list[GPTOutput]:
        """Forward and backward of this rank's micro-batches of one step (their gradients
        accumulated like PP 1's).  Returns per micro-batch what this stage knows of its output:
        ``lm_loss`` (None but on the last stage), ``aux_loss`` (the sum of this stage's
        coefficient-weighted aux losses, None without MoE layers) and ``moe_stats`` (this rank's
        MoE layers', in layer order)."""
        self._run(batches, train=True)
        out = []
        for i in range(self.num_microbatches):
            aux = [losses[i] for losses in self.aux_losses if losses]
            stats = [s for chunk in self.stats for s in chunk[i]]
            mtp = None
            if self.last:  # the MTP depths come after the layers (their routers too)
                mtp, mtp_aux, mtp_stats = self.head_outputs[i]
                aux, stats = aux + mtp_aux, stats + mtp_stats
            out.append(GPTOutput(lm_loss=self.lm_losses[i] if self.last else None,
                                 aux_loss=torch.stack(aux).sum() if aux else None, logits=None,
                                 moe_stats=stats, mtp_loss=mtp))
        return out

    @torch.no_grad()
    def forward_only(self, batches: list[dict]) -> list[torch.Tensor]:
        """The LM loss of each micro-batch (on the last stage; empty elsewhere), no backward."""
        self._run(batches, train=False)
        return list(self.lm_losses)
