"""--manual-gc: Python's automatic collection is off while training; the trainer collects every
--manual-gc-interval iterations and around evaluations, then puts automatic collection back."""

import gc

from megamoe.training.manual_gc import ManualGC


def _full_collections():
    seen = []

    def callback(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    return seen, callback


def test_manual_gc_collects_at_the_interval_and_around_evaluations_only():
    seen, callback = _full_collections()
    gc.callbacks.append(callback)
    try:
        policy = ManualGC(enabled=True, interval=5)
        policy.start()
        assert not gc.isenabled() and len(seen) == 1
        for iteration in range(1, 11):
            policy.after_step(iteration)
        assert len(seen) == 3  # iterations 5 and 10
        with policy.around_eval():
            pass
        assert len(seen) == 5
        policy.stop()
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(callback)
        gc.enable()


def test_without_manual_gc_nothing_changes():
    seen, callback = _full_collections()
    gc.callbacks.append(callback)
    try:
        policy = ManualGC(enabled=False, interval=0)
        policy.start()
        for iteration in range(1, 4):
            policy.after_step(iteration)
        with policy.around_eval():
            pass
        policy.stop()
        assert gc.isenabled() and seen == []
    finally:
        gc.callbacks.remove(callback)
