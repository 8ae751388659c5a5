"""The loss scaler's state machine (single process: it only sees the world-wide overflow flag)."""

from megamoe.optim.config import OptimizerConfig
from megamoe.optim.loss_scaler import LossScaler

import torch


def _run(scaler: LossScaler, overflows: str) -> list[float]:
    """Feed a sequence like "..xx." (x: overflow) and return the scale after each step."""
    scales = []
    for c in overflows:
        scaler.update(c == "x")
        scales.append(scaler.scale)
    return scales


def test_dynamic_scale_halves_after_hysteresis_consecutive_overflows():
    scaler = LossScaler(scale=1024, dynamic=True, min_scale=1, window=100, hysteresis=2)
    # one overflow is tolerated; a clean step restores the budget; the 2nd consecutive halves,
    # and every further consecutive overflow halves again
    assert _run(scaler, "x.x.xxx") == [1024, 1024, 1024, 1024, 1024, 512, 256]


def test_dynamic_scale_never_drops_below_min_and_grows_after_window_clean_steps():
    scaler = LossScaler(scale=4, dynamic=True, min_scale=2, window=3, hysteresis=1)
    assert _run(scaler, "xxx") == [2, 2, 2]
    assert _run(scaler, "..." + "..." + "..x...") == [2, 2, 4, 4, 4, 8, 8, 8, 4, 4, 4, 8]


def test_static_and_unscaled_configs_never_change_the_scale():
    for cfg, scale in (
        (OptimizerConfig(params_dtype=torch.float16, loss_scale=128.0), 128.0),
        (OptimizerConfig(params_dtype=torch.bfloat16), 1.0),
        (OptimizerConfig(params_dtype=torch.float32), 1.0),
    ):
        scaler = LossScaler.from_config(cfg)
        assert not scaler.dynamic
        assert _run(scaler, "xx..x") == [scale] * 5


def test_fp16_without_loss_scale_is_dynamic_and_resumes_from_its_state():
    cfg = OptimizerConfig(params_dtype=torch.float16, initial_loss_scale=2.0**16, hysteresis=2, loss_scale_window=5)
    scaler = LossScaler.from_config(cfg)
    assert scaler.dynamic and scaler.scale == 2.0**16
    _run(scaler, "xx..")
    resumed = LossScaler.from_config(cfg)
    resumed.load_state_dict(scaler.state_dict())
    assert _run(resumed, "...x") == _run(scaler, "...x")
