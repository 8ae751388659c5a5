"""Learning-rate schedule (Megatron's): linear warmup, then constant / linear / cosine / WSD decay.

``lr_at(iteration)`` is a pure function of the iteration, so a resumed run follows the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamoe.flags import check_fields, derived, flag, non_negative, positive, probability
from megamoe.optim.config import check_lr

DECAY_STYLES = ("constant", "linear", "cosine", "wsd")


@dataclass
class LRSchedule:
    lr: float = derived(help="--lr (OptimizerConfig): peak learning rate")
    min_lr: float = derived(0.0, help="--min-lr (OptimizerConfig)")
    decay_style: str = flag("cosine", name="--lr-decay-style", help="decay after warmup", choices=DECAY_STYLES)
    warmup_iters: int | float = flag(0, name="--lr-warmup-iters", type=int, help="linear warmup from 0",
                                     check=non_negative)  # a float when set by --lr-warmup-fraction
    warmup_fraction: float | None = flag(None, name="--lr-warmup-fraction", check=probability,
                                         help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    decay_iters: int | float | None = flag(None, name="--lr-decay-iters", type=int, help="iterations until --min-lr",
                                           check=non_negative, default_text="--train-iters")
    warmup_samples: int | None = flag(None, name="--lr-warmup-samples", check=non_negative,
                                      help="warmup in samples (Megatron's sample-based schedule)")
    decay_samples: int | None = flag(None, name="--lr-decay-samples", check=positive,
                                     help="samples until --min-lr (Megatron's sample-based schedule)")
    train_iters: int | None = derived(None, help="--train-iters: the default of --lr-decay-iters")
    samples_per_iteration: int = derived(1, help="the global batch: turns the --lr-*-samples flags into iterations")
    wsd_decay_iters: int | None = flag(None, name="--lr-wsd-decay-iters", help="length of wsd's final decay phase",
                                       default_text="10% of --lr-decay-iters")

    def __post_init__(self) -> None:
        check_fields(self)
        check_lr(self.lr, self.min_lr)
        # Samples become (fractional) iterations: the curve is Megatron's, whose steps count samples.
        if self.decay_samples is not None:
            if self.decay_iters is not None:
                raise ValueError("--lr-decay-samples and --lr-decay-iters are mutually exclusive")
            self.decay_iters = self.decay_samples / self.samples_per_iteration
        elif self.decay_iters is None:
            self.decay_iters = self.train_iters
        if self.decay_iters is None:
            raise ValueError("--lr-decay-iters is unset (the command line defaults it to --train-iters)")
        warmups = [name for name, value in (("--lr-warmup-iters", self.warmup_iters),
                                            ("--lr-warmup-fraction", self.warmup_fraction),
                                            ("--lr-warmup-samples", self.warmup_samples)) if value]
        if len(warmups) > 1:
            raise ValueError(f"{' and '.join(warmups)} are mutually exclusive")
        if self.warmup_samples:
            self.warmup_iters = self.warmup_samples / self.samples_per_iteration
        if self.warmup_fraction is not None:
            # Megatron's rule, unrounded: the warmup may end between two iterations.
            self.warmup_iters = self.warmup_fraction * self.decay_iters
        if self.wsd_decay_iters is None:
            self.wsd_decay_iters = max(1, self.decay_iters // 10)
        if self.decay_style != "constant" and self.warmup_iters > self.decay_iters:
            raise ValueError(
                f"the warmup ({self.warmup_iters:g} iterations) exceeds --lr-decay-iters ({self.decay_iters:g} iterations)"
            )
        if self.decay_style == "wsd" and not 0 < self.wsd_decay_iters <= self.decay_iters - self.warmup_iters:
            raise ValueError(
                f"--lr-wsd-decay-iters {self.wsd_decay_iters} must be in [1, --lr-decay-iters - --lr-warmup-iters"
                f" = {self.decay_iters - self.warmup_iters}]"
            )

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the step that produces iteration ``iteration + 1`` (0-based step index)."""
        if self.warmup_iters > 0 and iteration + 1 <= self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.lr
        if iteration >= self.decay_iters:
            return self.min_lr
        span = self.lr - self.min_lr
        if self.decay_style == "wsd":
            decay_start = self.decay_iters - self.wsd_decay_iters
            if iteration < decay_start:
                return self.lr
            return self.lr - span * (iteration - decay_start) / self.wsd_decay_iters
        progress = max(0.0, iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            return self.lr - span * progress
        return self.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * progress))
