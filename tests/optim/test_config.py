"""OptimizerConfig rejects values that cannot work, naming the flag."""

import pytest
import torch

from megamoe.optim import OptimizerConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), r"--lr must be >= 0"),
        (dict(lr=1e-4, min_lr=1e-3), r"--min-lr 0.001 is larger than --lr"),
        (dict(weight_decay=-0.1), r"--weight-decay must be >= 0"),
        (dict(adam_beta2=1.0), r"--adam-beta2 must be in \[0, 1\)"),
        (dict(adam_eps=0.0), r"--adam-eps must be > 0"),
        (dict(clip_grad=-1.0), r"--clip-grad must be >= 0"),
        (dict(loss_scale=128.0), r"--loss-scale needs --fp16 or --bf16"),
        (dict(params_dtype=torch.float16, loss_scale=0.0), r"--loss-scale must be > 0"),
        (dict(params_dtype=torch.float16, min_loss_scale=8.0, initial_loss_scale=4.0), r"--min-loss-scale 8.0 is larger"),
        (dict(loss_scale_window=0), r"--loss-scale-window must be >= 1"),
        (dict(hysteresis=0), r"--hysteresis must be >= 1"),
        (dict(params_dtype=torch.float64), r"use fp32 \(default\), --bf16 or --fp16"),
    ],
)
def test_invalid_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_dynamic_loss_scaling_only_for_fp16_without_static_scale():
    assert OptimizerConfig(params_dtype=torch.float16).dynamic_loss_scaling
    assert not OptimizerConfig(params_dtype=torch.float16, loss_scale=1024.0).dynamic_loss_scaling
    assert not OptimizerConfig(params_dtype=torch.bfloat16).dynamic_loss_scaling
