"""Activation recomputation (--recompute-granularity full): a transformer layer keeps only its
input for backward and runs its forward again when backward reaches it.

Uses ``torch.utils.checkpoint`` (non-reentrant), which restores the default RNG streams for the
second forward; the context below also restores the model-parallel stream of
``megamoe.parallel.random``, so dropout draws the same masks twice.  Inside an MoE layer the
recomputation repeats the all-to-all: every rank of the EP group reaches the same layer's
backward, so the collectives still pair up.
"""

from __future__ import annotations

import contextlib
import functools
import threading

from torch.utils.checkpoint import checkpoint

from megamoe.parallel.random import RNGStatesTracker

_state = threading.local()


def is_recomputing() -> bool:
    """True inside the second forward of a recomputed layer (state kept across micro-batches,
    such as ``global_aux_loss``'s counts, must not be updated twice)."""
    return getattr(_state, "recomputing", False)


def _tracker_contexts(tracker: RNGStatesTracker):
    """(forward context, recomputation context): the second puts back the tracker's streams as
    they were when the first forward ran."""
    states = tracker.get_states()

    @contextlib.contextmanager
    def replay():
        current = tracker.get_states()
        tracker.set_states(states)
        _state.recomputing = True
        try:
            yield
        finally:
            _state.recomputing = False
            tracker.set_states(current)

    return contextlib.nullcontext(), replay()


def recomputed(tracker: RNGStatesTracker, layer, *inputs):
    """``layer(*inputs)``, its activations recomputed in backward instead of stored; ``tracker``
    (the layout's ``rng``) is replayed so dropout draws the same masks twice."""
    return checkpoint(layer, *inputs, use_reentrant=False, context_fn=functools.partial(_tracker_contexts, tracker))
