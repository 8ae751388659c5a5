"""OptimizerConfig: Adam hyper-parameters, precision, loss scaling, ZeRO-1 and bucketing.

Each field names the Megatron flag that sets it; ``__post_init__`` raises ``ValueError`` naming
the flag when a value cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARAMS_DTYPES = {torch.float32: "fp32", torch.bfloat16: "--bf16", torch.float16: "--fp16"}
GRAD_REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4  # --lr: peak learning rate (the trainer's schedule calls set_lr every step)
    min_lr: float = 0.0  # --min-lr: floor of the schedule (read by the schedule, stored here for it)
    weight_decay: float = 0.01  # --weight-decay: decoupled (AdamW), only on params tagged weight_decay
    adam_beta1: float = 0.9  # --adam-beta1
    adam_beta2: float = 0.999  # --adam-beta2
    adam_eps: float = 1e-8  # --adam-eps
    clip_grad: float = 1.0  # --clip-grad: max global L2 norm; 0 turns clipping off
    use_distributed_optimizer: bool = False  # --use-distributed-optimizer: ZeRO-1
    params_dtype: torch.dtype = torch.float32  # --bf16 / --fp16: dtype of the model's parameters
    loss_scale: float | None = None  # --loss-scale: static loss scale (fp16/bf16); None: dynamic for fp16
    initial_loss_scale: float = 2.0**32  # --initial-loss-scale: first dynamic scale (fp16)
    min_loss_scale: float = 1.0  # --min-loss-scale: the dynamic scale never halves below this
    loss_scale_window: int = 1000  # --loss-scale-window: clean steps before the dynamic scale doubles
    hysteresis: int = 2  # --hysteresis: consecutive overflows before the dynamic scale halves
    grad_reduce_dtype: torch.dtype = torch.float32  # dtype of the gradient collectives (main grads stay fp32)
    bucket_size: int = 40_000_000  # elements per gradient bucket (one collective each)
    # --overlap-grad-reduce: launch each bucket's reduction during the last micro-batch's backward,
    # as soon as all its gradients are accumulated (megamoe.optim.grad_sync)
    overlap_grad_reduce: bool = False

    def __post_init__(self) -> None:
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(
                f"params dtype {self.params_dtype} is not supported; use fp32 (default), --bf16 or --fp16"
            )
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ValueError(f"grad reduce dtype {self.grad_reduce_dtype}: valid values are {list(GRAD_REDUCE_DTYPES)}")
        for flag, value in (("--lr", self.lr), ("--min-lr", self.min_lr), ("--weight-decay", self.weight_decay)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        for flag, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0 turns clipping off), got {self.clip_grad}")
        if self.loss_scale is not None:
            if self.loss_scale <= 0:
                raise ValueError(f"--loss-scale must be > 0, got {self.loss_scale}")
            if self.params_dtype == torch.float32:
                raise ValueError("--loss-scale needs --fp16 or --bf16 (fp32 training does not scale the loss)")
        if self.initial_loss_scale <= 0 or self.min_loss_scale <= 0:
            raise ValueError(
                f"--initial-loss-scale ({self.initial_loss_scale}) and --min-loss-scale ({self.min_loss_scale}) must be > 0"
            )
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(
                f"--min-loss-scale {self.min_loss_scale} is larger than --initial-loss-scale {self.initial_loss_scale}"
            )
        if self.loss_scale_window < 1:
            raise ValueError(f"--loss-scale-window must be >= 1, got {self.loss_scale_window}")
        if self.hysteresis < 1:
            raise ValueError(f"--hysteresis must be >= 1, got {self.hysteresis}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket size must be >= 1 element, got {self.bucket_size}")

    @property
    def dynamic_loss_scaling(self) -> bool:
        """fp16 without a static --loss-scale."""
        return self.params_dtype == torch.float16 and self.loss_scale is None
