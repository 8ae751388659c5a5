"""--manual-gc: Python's garbage collector collects when the trainer says, not when it likes.

An automatic collection pauses a rank for as long as it takes, at a different step on each
rank, and every collective then waits for the slowest; with --manual-gc the ranks collect
together, every --manual-gc-interval iterations and around each evaluation (Megatron's rule).

    gc_policy = ManualGC(enabled=True, interval=10)
    gc_policy.start()                 # automatic collection off, one collection now
    gc_policy.after_step(iteration)   # collects when iteration % interval == 0
    with gc_policy.around_eval(): ...
    gc_policy.stop()                  # automatic collection back as it was
"""

from __future__ import annotations

import contextlib
import gc


class ManualGC:
    def __init__(self, *, enabled: bool, interval: int) -> None:
        self.enabled = enabled
        self.interval = interval
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def around_eval(self):
        """Evaluation builds its own garbage: collect before and after it."""
        if self.enabled:
            gc.collect()
        try:
            yield
        finally:
            if self.enabled:
                gc.collect()

    def stop(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()
