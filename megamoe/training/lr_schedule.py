"""Learning-rate schedule (Megatron's): linear warmup, then constant / linear / cosine / WSD decay.

``lr_at(iteration)`` is a pure function of the iteration, so a resumed run follows the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine", "wsd")


@dataclass
class LRSchedule:
    lr: float  # --lr: peak learning rate
    min_lr: float = 0.0  # --min-lr
    decay_style: str = "cosine"  # --lr-decay-style
    warmup_iters: int = 0  # --lr-warmup-iters
    decay_iters: int = 0  # --lr-decay-iters (default: --train-iters)
    wsd_decay_iters: int = 0  # --lr-wsd-decay-iters: length of the final decay phase of wsd

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.decay_style!r}: valid values are {list(DECAY_STYLES)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.warmup_iters < 0 or self.decay_iters < 0:
            raise ValueError("--lr-warmup-iters and --lr-decay-iters must be >= 0")
        if self.decay_style != "constant" and self.warmup_iters > self.decay_iters:
            raise ValueError(
                f"--lr-warmup-iters {self.warmup_iters} exceeds --lr-decay-iters {self.decay_iters}"
            )
        if self.decay_style == "wsd" and not 0 < self.wsd_decay_iters <= self.decay_iters - self.warmup_iters:
            raise ValueError(
                f"--lr-wsd-decay-iters {self.wsd_decay_iters} must be in [1, --lr-decay-iters - --lr-warmup-iters"
                f" = {self.decay_iters - self.warmup_iters}]"
            )

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the step that produces iteration ``iteration + 1`` (0-based step index)."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
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
        progress = (iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            return self.lr - span * progress
        return self.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * progress))
