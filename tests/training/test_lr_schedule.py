"""The LR schedule follows Megatron's curves and rejects inconsistent flags."""

import math

import pytest

from megamoe.training.lr_schedule import LRSchedule


def test_warmup_then_cosine_reaches_min_lr():
    s = LRSchedule(lr=1.0, min_lr=0.1, decay_style="cosine", warmup_iters=10, decay_iters=110)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)


def test_linear_constant_and_wsd():
    linear = LRSchedule(lr=2.0, min_lr=0.0, decay_style="linear", decay_iters=100)
    assert linear.lr_at(50) == pytest.approx(1.0)
    constant = LRSchedule(lr=2.0, decay_style="constant", decay_iters=0)
    assert constant.lr_at(1000) == 2.0
    wsd = LRSchedule(lr=1.0, min_lr=0.0, decay_style="wsd", warmup_iters=0, decay_iters=100, wsd_decay_iters=20)
    assert wsd.lr_at(79) == 1.0
    assert wsd.lr_at(90) == pytest.approx(0.5)
    assert wsd.lr_at(100) == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=1.0, decay_style="exp"), "--lr-decay-style 'exp'"),
        (dict(lr=1.0, min_lr=2.0), r"--min-lr 2.0 must be in \[0, --lr 1.0\]"),
        (dict(lr=1.0, warmup_iters=20, decay_iters=10), "--lr-warmup-iters 20 exceeds --lr-decay-iters 10"),
        (dict(lr=1.0, decay_style="wsd", decay_iters=10, wsd_decay_iters=0), "--lr-wsd-decay-iters"),
    ],
)
def test_invalid_schedules_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(**kwargs)
