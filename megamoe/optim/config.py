"""OptimizerConfig: Adam hyper-parameters, precision, loss scaling, ZeRO-1 and bucketing.

Each field declares the Megatron flag that sets it (``megamoe.flags``); ``__post_init__`` raises
``ValueError`` naming the flag when a value cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.flags import at_least_one, check_fields, derived, flag, non_negative, positive, probability

PARAMS_DTYPES = {torch.float32: "fp32", torch.bfloat16: "--bf16", torch.float16: "--fp16"}
GRAD_REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_lr(lr: float, min_lr: float) -> None:
    """--lr and --min-lr: both >= 0 and the floor not above the peak (the optimizer and the
    schedule both hold them)."""
    for name, value in (("--lr", lr), ("--min-lr", min_lr)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if min_lr > lr:
        raise ValueError(f"--min-lr {min_lr} is larger than --lr {lr}: --min-lr {min_lr} must be in [0, --lr {lr}]")


@dataclass
class OptimizerConfig:
    """Defaults are the command line's."""

    lr: float = flag(3e-4, help="peak learning rate (the schedule sets the step's lr)")
    min_lr: float = flag(0.0, help="floor of the learning-rate schedule")
    weight_decay: float = flag(0.01, help="decoupled (AdamW) weight decay, on params tagged weight_decay",
                               check=non_negative)
    adam_beta1: float = flag(0.9, help="Adam beta1", check=probability)
    adam_beta2: float = flag(0.999, help="Adam beta2", check=probability)
    adam_eps: float = flag(1e-8, help="Adam epsilon", check=positive)
    clip_grad: float = flag(1.0, help="max global L2 grad norm; 0 turns clipping off", check=non_negative)
    use_distributed_optimizer: bool = flag(False, help="ZeRO-1: shard the optimizer state over DP (experts: EDP)")
    overlap_grad_reduce: bool = flag(False, help="launch each gradient bucket's reduction during the last "
                                                 "micro-batch's backward (megamoe.optim.grad_sync)")
    params_dtype: torch.dtype = derived(torch.float32, help="--bf16 / --fp16: dtype of the model's parameters")
    loss_scale: float | None = flag(None, help="static loss scale (fp16/bf16)", check=positive,
                                    default_text="dynamic with --fp16")
    initial_loss_scale: float = flag(2.0**32, help="first dynamic loss scale (fp16)", check=positive)
    min_loss_scale: float = flag(1.0, help="the dynamic scale never halves below this", check=positive)
    loss_scale_window: int = flag(1000, help="clean steps before the dynamic scale doubles", check=at_least_one)
    hysteresis: int = flag(2, help="consecutive overflows before the dynamic scale halves", check=at_least_one)
    grad_reduce_dtype: torch.dtype = derived(torch.float32, help="set in code: dtype of the gradient collectives "
                                                                 "(main grads stay fp32)")
    bucket_size: int = derived(40_000_000, help="set in code: elements per gradient bucket (one collective each)")

    def __post_init__(self) -> None:
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(
                f"params dtype {self.params_dtype} is not supported; use fp32 (default), --bf16 or --fp16"
            )
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ValueError(f"grad reduce dtype {self.grad_reduce_dtype}: valid values are {list(GRAD_REDUCE_DTYPES)}")
        check_lr(self.lr, self.min_lr)
        check_fields(self)
        if self.loss_scale is not None and self.params_dtype == torch.float32:
            raise ValueError("--loss-scale needs --fp16 or --bf16 (fp32 training does not scale the loss)")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(
                f"--min-loss-scale {self.min_loss_scale} is larger than --initial-loss-scale {self.initial_loss_scale}"
            )
        if self.bucket_size < 1:
            raise ValueError(f"bucket size must be >= 1 element, got {self.bucket_size}")

    @property
    def dynamic_loss_scaling(self) -> bool:
        """fp16 without a static --loss-scale."""
        return self.params_dtype == torch.float16 and self.loss_scale is None
