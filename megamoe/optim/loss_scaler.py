"""The loss scaler: one per model, updated from the one world-wide overflow decision.

fp16 gradients underflow without scaling, so the loss is multiplied by ``scale`` before backward
and the fp32 main gradients are multiplied by ``1 / scale`` once, before the norm.

* static (``--loss-scale S``, fp16 or bf16): the scale is always ``S``.
* dynamic (fp16 without ``--loss-scale``): starts at ``--initial-loss-scale``.  An overflowing
  step (non-finite gradient anywhere) is skipped; after ``--hysteresis`` *consecutive*
  overflows the scale halves, and it halves again on every further consecutive overflow, never
  below ``--min-loss-scale``.  A clean step restores the hysteresis budget.  After
  ``--loss-scale-window`` clean steps in a row the scale doubles.
* fp32 and bf16 without ``--loss-scale``: the scale is 1 and never changes.
"""

from __future__ import annotations

from megamoe.optim.config import OptimizerConfig


class LossScaler:
    def __init__(
        self, *, scale: float, dynamic: bool, min_scale: float = 1.0, window: int = 1000, hysteresis: int = 2
    ) -> None:
        self.scale = float(scale)
        self.dynamic = dynamic
        self.min_scale = float(min_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.clean_steps = 0  # clean steps since the last overflow or the last growth
        self.overflows_left = hysteresis  # overflows still tolerated before halving

    @classmethod
    def from_config(cls, cfg: OptimizerConfig) -> "LossScaler":
        if cfg.dynamic_loss_scaling:
            return cls(
                scale=cfg.initial_loss_scale,
                dynamic=True,
                min_scale=cfg.min_loss_scale,
                window=cfg.loss_scale_window,
                hysteresis=cfg.hysteresis,
            )
        return cls(scale=cfg.loss_scale if cfg.loss_scale is not None else 1.0, dynamic=False)

    def update(self, found_nonfinite: bool) -> None:
        """Advance the state machine by one step; ``found_nonfinite`` must be the same on every rank."""
        if not self.dynamic:
            return
        if found_nonfinite:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                # stays at 0: every further consecutive overflow halves again
                self.overflows_left = 0
            return
        self.overflows_left = self.hysteresis
        self.clean_steps += 1
        if self.clean_steps == self.window:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, sd: dict) -> None:
        """Resume a dynamic scaler; a static one keeps the scale its flags give."""
        if not self.dynamic:
            return
        self.scale = float(sd["scale"])
        self.clean_steps = int(sd["clean_steps"])
        self.overflows_left = int(sd["overflows_left"])
