"""Learning-rate schedule (Megatron's): linear warmup, then constant / linear / cosine / WSD decay.

``lr_at(iteration)`` is a pure function of the iteration and of the values ``curve()`` lists, which
a checkpoint records: ``resumed`` refuses to resume onto another curve unless one of Megatron's
two flags says which one to follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamoe.flags import check_fields, derived, flag, non_negative, positive, probability
from megamoe.optim.config import check_lr

DECAY_STYLES = ("constant", "linear", "cosine", "wsd")
# The values that fix the curve, as a checkpoint records them, with the flags that set each.
CURVE = (
    ("lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("decay_style", "--lr-decay-style"),
    ("warmup_iters", "--lr-warmup-iters/-fraction/-samples"),
    ("decay_iters", "--lr-decay-iters/-samples, default --train-iters"),
    ("wsd_decay_iters", "--lr-wsd-decay-iters"),
)


@dataclass
class LRSchedule:
    lr: float = derived(help="--lr (OptimizerConfig): peak learning rate")
    min_lr: float = derived(0.0, help="--min-lr (OptimizerConfig)")
    decay_style: str = flag("cosine", name="--lr-decay-style", help="decay after warmup", choices=DECAY_STYLES)
    warmup_init: float = flag(0.0, name="--lr-warmup-init", help="the learning rate the linear warmup starts "
                                                                  "from", check=non_negative)
    warmup_iters: int | float = flag(0, name="--lr-warmup-iters", type=int, help="linear warmup from --lr-warmup-init",
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
    override_opt_param_scheduler: bool = flag(
        False, name="--override-opt_param-scheduler",
        help="on resume, follow this command line's schedule (--lr, --min-lr, warmup, decay iterations, decay "
             "style) and ignore the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, name="--use-checkpoint-opt_param-scheduler",
        help="on resume, follow the checkpoint's schedule and ignore this command line's schedule flags")

    def __post_init__(self) -> None:
        check_fields(self)
        check_lr(self.lr, self.min_lr)
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                             "exclusive (follow the flags' schedule, or the checkpoint's)")
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
            return self.warmup_init + (self.lr - self.warmup_init) * (iteration + 1) / self.warmup_iters
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

    def curve(self) -> dict:
        """The resolved values ``lr_at`` depends on (warmup and decay in iterations), JSON-ready."""
        return {name: getattr(self, name) for name, _ in CURVE}

    def resumed(self, saved: dict | None, checkpoint: str) -> tuple["LRSchedule", str | None]:
        """The schedule a run resumed from ``checkpoint``, whose ``curve()`` was ``saved``, follows,
        and a line for the log when the two differ (None when they agree).

        As Megatron's: a difference is refused (``ValueError`` naming each value, both sides and
        the flags) unless ``--override-opt_param-scheduler`` (the flags win) or
        ``--use-checkpoint-opt_param-scheduler`` (the checkpoint wins) is given.  ``saved`` None:
        the checkpoint recorded no schedule (a Hugging Face import), so the flags are followed.
        """
        if saved is None:
            if self.use_checkpoint_opt_param_scheduler:
                raise ValueError(f"--use-checkpoint-opt_param-scheduler: {checkpoint} records no learning-rate "
                                 "schedule; give the schedule's flags instead")
            return self, None
        now = self.curve()
        differ = [f"{name} ({flags}): saved {saved.get(name)!r} vs now {now[name]!r}"
                  for name, flags in CURVE if saved.get(name) != now[name]]
        if not differ:
            return self, None
        details = "; ".join(differ)
        if self.override_opt_param_scheduler:
            return self, f"--override-opt_param-scheduler: following the flags' learning-rate schedule ({details})"
        if self.use_checkpoint_opt_param_scheduler:
            kept = LRSchedule(**{name: saved[name] for name, _ in CURVE}, train_iters=self.train_iters,
                              samples_per_iteration=self.samples_per_iteration,
                              use_checkpoint_opt_param_scheduler=True)
            return kept, (f"--use-checkpoint-opt_param-scheduler: following {checkpoint}'s learning-rate schedule "
                          f"({details})")
        raise ValueError(
            f"{checkpoint} was trained with another learning-rate schedule ({details}); resuming would reshape it: "
            "give --use-checkpoint-opt_param-scheduler to keep the saved schedule, or --override-opt_param-scheduler "
            "to follow the flags"
        )
