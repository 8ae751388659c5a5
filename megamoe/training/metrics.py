"""Per-interval training metrics, kept as device tensors until the log step.

Between log steps nothing is copied to the host: losses and expert counts accumulate on the
device, and ``finish_interval`` does one all-reduce over DP (at PP > 1 two more over the PP
group) and one host copy.  Averages: ``lm_loss``/``mtp_loss`` (unscaled, the mean over the MTP
depths) are means over the interval's micro-batches and DP ranks (the loss of the global batch),
``aux_loss``/``z_loss``/``dropped_fraction`` means over those and the MoE layers; expert token
counts are per step, summed over DP ranks, then min/max over the experts of every MoE layer.  At
PP > 1 the LM loss is the last stage's and each stage holds its own MoE layers: the sums travel
over the PP group, so every rank (rank 0 logs) gets PP 1's figures.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from megamoe.parallel.state import ParallelState
from megamoe.training.flops import mfu


class IntervalMetrics:
    def __init__(self, *, layout: ParallelState, device: torch.device, flops_per_token: float,
                 peak_tflops: float | None) -> None:
        self.layout = layout
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.skipped_total = 0
        self._reset()

    def _reset(self) -> None:
        # lm, sums over (micro-batch, MoE layer) of aux (raw) and z (raw), MTP (unscaled), the sum of
        # the dropped fraction, how many (micro-batch, MoE layer) pairs those add up, and how many
        # micro-batches had an MTP loss (at PP > 1 only the last stage's do)
        self.losses = torch.zeros(7, device=self.device)
        self.micro_batches = 0
        self.steps = 0
        self.tokens = 0
        self.expert_tokens: list[torch.Tensor] | None = None
        self.start = time.perf_counter()
        self.excluded = 0.0  # seconds of evaluation and checkpointing inside this interval
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoint saves) does not count towards tokens/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def add_micro_batch(self, out) -> None:
        """``out``: the model's GPTOutput for one micro-batch (at PP > 1 this stage's part: no LM
        loss but on the last stage)."""
        if out.lm_loss is not None:
            self.losses[0] += out.lm_loss.detach()
        self.micro_batches += 1
        if out.mtp_loss is not None:
            self.losses[3] += out.mtp_loss.detach()
            self.losses[6] += 1
        if not out.moe_stats:
            return
        self.losses[1] += torch.stack([s.aux_loss for s in out.moe_stats]).detach().sum()
        self.losses[2] += torch.stack([s.z_loss for s in out.moe_stats]).detach().sum()
        self.losses[4] += torch.stack([s.dropped_fraction for s in out.moe_stats]).float().sum()
        self.losses[5] += len(out.moe_stats)
        counts = [s.tokens_per_expert.detach().float() for s in out.moe_stats]
        if self.expert_tokens is None:
            self.expert_tokens = counts
        else:
            self.expert_tokens = [a + b for a, b in zip(self.expert_tokens, counts)]

    def add_step(self, result, *, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.skipped_total = result.num_skipped_total

    def finish_interval(self, iteration: int, consumed_samples: int, lr: float, result) -> dict:
        """All-reduce the interval's sums over DP and return one log record (host sync here only)."""
        state = self.layout
        has_experts = self.expert_tokens is not None
        packed = [self.losses] + (self.expert_tokens if has_experts else [])
        flat = torch.cat([t.reshape(-1).float() for t in packed])
        if state.dp_size > 1:
            dist.all_reduce(flat, group=state.dp_group)
        sums = flat[:7]
        # -min, max and the imbalance of the per-step expert loads of this stage's MoE layers
        loads = torch.full((3,), -math.inf, device=self.device)
        if has_experts:
            per_step = flat[7:] / max(1, self.steps)
            offset, mins, maxs, imbalance = 0, [], [], []
            for counts in self.expert_tokens:
                layer = per_step[offset : offset + counts.numel()]
                offset += counts.numel()
                mins.append(layer.min())
                maxs.append(layer.max())
                imbalance.append(layer.max() / layer.mean().clamp(min=1e-9))
            loads = torch.stack([-torch.stack(mins).min(), torch.stack(maxs).max(), torch.stack(imbalance).max()])
        if state.pp_size > 1:
            dist.all_reduce(sums, group=state.pp_group)
            dist.all_reduce(loads, op=dist.ReduceOp.MAX, group=state.pp_group)
        sums, loads = sums.cpu(), loads.cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.start - self.excluded
        denominator = max(1, self.micro_batches) * state.dp_size
        lm, mtp = sums[0].item() / denominator, sums[3].item() / denominator
        moe_entries = sums[5].item()
        has_moe = moe_entries > 0
        aux, z, dropped = (sums[[1, 2, 4]] / max(moe_entries, 1.0)).tolist()
        tokens_per_sec = self.tokens / elapsed
        tflops = self.flops_per_token * tokens_per_sec / state.world_size / 1e12
        record = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "lm_loss": lm,
            "aux_loss": aux if has_moe else None,
            "z_loss": z if has_moe else None,
            "mtp_loss": mtp if sums[6].item() > 0 else None,
            "grad_norm": result.grad_norm,
            "grad_norm_inf": result.grad_norm_inf,
            "params_norm": None,
            "num_zeros_in_grad": None,
            "lr": lr,
            "loss_scale": result.loss_scale,
            "skipped_iters": self.skipped_total,
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": tflops,
            "mfu": mfu(tflops, self.peak_tflops),
            "max_memory_gib": (
                torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            ),
            "expert_tokens_min": -loads[0].item() if has_moe else None,
            "expert_tokens_max": loads[1].item() if has_moe else None,
            "expert_load_imbalance": loads[2].item() if has_moe else None,
            "dropped_fraction": dropped if has_moe else None,
            "elapsed_ms_per_iter": 1000.0 * elapsed / max(1, self.steps),
        }
        self._reset()
        return record
