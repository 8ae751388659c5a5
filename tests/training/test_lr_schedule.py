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
        (dict(lr=1.0, warmup_iters=20, decay_iters=10), r"the warmup \(20 iterations\) exceeds --lr-decay-iters \(10 "),
        (dict(lr=1.0, decay_style="wsd", decay_iters=10, wsd_decay_iters=0), "--lr-wsd-decay-iters"),
        (dict(lr=1.0, decay_iters=10, warmup_iters=2, warmup_fraction=0.1),
         "--lr-warmup-iters and --lr-warmup-fraction are mutually exclusive"),
        (dict(lr=1.0, decay_iters=10, warmup_iters=2, warmup_samples=8),
         "--lr-warmup-iters and --lr-warmup-samples are mutually exclusive"),
        (dict(lr=1.0, decay_iters=10, decay_samples=80), "--lr-decay-samples and --lr-decay-iters are mutually"),
        (dict(lr=1.0, decay_iters=10, warmup_fraction=1.5), "--lr-warmup-fraction"),
    ],
)
def test_invalid_schedules_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(**kwargs)


def test_warmup_fraction_is_that_share_of_the_decay_iterations():
    by_fraction = LRSchedule(lr=1.0, min_lr=0.1, warmup_fraction=0.25, decay_iters=40)
    by_iters = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=40)
    assert [by_fraction.lr_at(i) for i in range(45)] == [by_iters.lr_at(i) for i in range(45)]
    between = LRSchedule(lr=1.0, warmup_fraction=0.05, decay_iters=50)  # 2.5 iterations, as Megatron keeps it
    assert between.lr_at(1) == pytest.approx(2 / 2.5) and between.lr_at(2) == pytest.approx(1.0)


def test_sample_based_schedule_is_the_iteration_schedule_of_samples_over_the_global_batch():
    """Megatron's sample-based steps: warmup 64 and decay 640 samples at 8 per iteration are
    warmup 8 and decay 80 iterations; 20 warmup samples end between iterations 2 and 3."""
    by_samples = LRSchedule(lr=1.0, min_lr=0.1, warmup_samples=64, decay_samples=640, samples_per_iteration=8)
    by_iters = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=8, decay_iters=80)
    assert [by_samples.lr_at(i) for i in range(90)] == pytest.approx([by_iters.lr_at(i) for i in range(90)])
    between = LRSchedule(lr=1.0, warmup_samples=20, train_iters=50, samples_per_iteration=8)
    assert between.decay_iters == 50
    assert between.lr_at(1) == pytest.approx(16 / 20) and between.lr_at(2) == pytest.approx(1.0)


def test_lr_warmup_init_is_where_the_warmup_starts():
    """Megatron: lr = init + (lr - init) * step / warmup during the warmup (DeepSeek-V3's config
    warms up from a tenth of the peak)."""
    s = LRSchedule(lr=1.0, min_lr=0.1, decay_style="cosine", warmup_iters=10, decay_iters=110, warmup_init=0.1)
    assert s.lr_at(0) == pytest.approx(0.1 + 0.9 * 1 / 10)
    assert s.lr_at(4) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110).lr_at(60))
