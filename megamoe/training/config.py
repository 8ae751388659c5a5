"""The training run's config dataclasses; each field declares its flag (``megamoe.flags``).

One dataclass per concern, each living with the package that reads it: the architecture
(``ModelConfig``: what a checkpoint and Hugging Face describe), the parallel layout
(``ParallelConfig``), how the model runs (``ExecutionConfig``: precision, recomputation,
chunking, GEMM path), the optimizer, the schedule and the data.  These below hold what only the
trainer reads.  ``RunConfig`` gathers them all; ``megamoe.training.arguments`` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamoe.data.build import DataConfig
from megamoe.flags import check_fields, derived, flag, non_negative, positive
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.optim import OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.training.lr_schedule import LRSchedule


@dataclass
class TrainConfig:
    micro_batch_size: int = flag(4, help="samples per rank per forward/backward", check=positive)
    global_batch_size: int | None = flag(None, help="samples per optimizer step", check=positive,
                                         default_text="micro batch x data parallel")
    train_iters: int | None = flag(None, type=int, help="optimizer steps", check=positive,
                                   default_text="100, or --train-samples / --global-batch-size")
    train_samples: int | None = flag(None, help="samples to train on, instead of --train-iters (Megatron's "
                                                "sample-based run)", check=positive)
    seq_length: int = flag(128, help="tokens per sample", check=positive)
    seed: int = flag(1234, help="seed of the init, the data order and dropout")
    eval_interval: int = flag(0, help="evaluate every N iterations (0: never)", check=non_negative)
    eval_iters: int = flag(10, help="global batches per evaluation", check=positive)
    skip_train: bool = flag(False, help="evaluate only: set up (and --load), evaluate --eval-iters global batches "
                                        "of the validation split once, and exit without training or saving")
    device: str | None = flag(None, help="where to train", choices=("cpu", "cuda"),
                              default_text="cuda when available")
    distributed_timeout_minutes: int | None = flag(
        None, help="how long a collective may wait for the other ranks before the run fails", check=positive,
        default_text="torch's: 30 with gloo, 10 with NCCL")
    exit_signal_handler: bool = flag(False, help="save and exit on SIGTERM or SIGINT (Ctrl-C)")
    check_for_nan_in_loss_and_grad: bool = flag(
        True, name="--no-check-for-nan-in-loss-and-grad",
        help="do not stop on a NaN/inf loss or gradient (bf16, fp32): skip the step instead; fp16 always "
             "skips a step with a non-finite gradient (the loss scaler backs off)",
    )
    exit_interval: int | None = flag(None, help="save and exit after the first iteration that is a multiple of N",
                                     check=positive)
    exit_duration_in_mins: float | None = flag(None, help="save and exit once this many minutes have passed since "
                                                          "the run started (agreed over the ranks)", check=positive)
    compile: bool = flag(False, help="regional torch.compile of attention, norms and dense MLPs")
    manual_gc: bool = flag(False, help="turn Python's automatic garbage collection off (no pauses at random "
                                       "steps, different on each rank); collect at --manual-gc-interval and "
                                       "around evaluations")
    manual_gc_interval: int = flag(0, help="with --manual-gc: collect every N iterations (0: only at the start "
                                           "and around evaluations)", check=non_negative)
    eod_mask_loss: bool = flag(False, help="no loss on positions whose input token is EOD")
    bf16: bool = flag(False, help="bf16 parameters with fp32 main grads and master weights")
    fp16: bool = flag(False, help="fp16 parameters with loss scaling, fp32 main grads and master weights")
    num_microbatches: int = derived(1, help="global batch / (micro batch x DP)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.manual_gc_interval and not self.manual_gc:
            raise ValueError("--manual-gc-interval needs --manual-gc")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are mutually exclusive")
        if self.train_samples is not None:
            if self.train_iters is not None:
                raise ValueError("--train-samples and --train-iters are mutually exclusive")
            batch = self.global_batch_size or self.micro_batch_size
            if self.train_samples < batch:
                raise ValueError(f"--train-samples {self.train_samples} is less than one global batch ({batch})")
            self.train_iters = self.train_samples // batch
        elif self.train_iters is None:
            self.train_iters = 100

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class CheckpointConfig:
    save: str | None = flag(None, help="directory to save checkpoints to")
    load: str | None = flag(None, help="directory to resume (or --finetune) from")
    save_interval: int = flag(0, help="save every N iterations (0: only at the end, with --save)",
                              check=non_negative)
    keep_last: int = flag(0, help="keep the newest N checkpoints (0: all)", check=non_negative)
    save_on_rendezvous_change: bool = flag(
        False, help="elastic runs: on SIGTERM (what torchrun sends the workers it stops when a node leaves on purpose "
                    "or joins) every rank saves at the end of the step and exits with status 143, so that the agents "
                    "that stay start new workers, which resume in the new world without losing a step")
    finetune: bool = flag(False, help="load weights only: reset iteration, optimizer and data position")
    use_checkpoint_args: bool = flag(False, help="the model's architecture flags from --load's checkpoint, in place of "
                                                 "the command line's (e.g. an imported Hugging Face model)")
    no_load_optim: bool = flag(False, help="do not load the optimizer state")
    no_load_rng: bool = flag(False, help="do not load the RNG states")
    no_save_optim: bool = flag(False, help="save the weights only, no optimizer state (resume such a checkpoint "
                                           "with --finetune or --no-load-optim)")
    async_save: bool = flag(False, help="write checkpoints in the background while training continues; the "
                                        "'latest' marker moves once every rank's file is written")

    def __post_init__(self) -> None:
        check_fields(self)
        for given, needs in ((self.save_interval, "--save-interval"), (self.keep_last, "--keep-last"),
                             (self.async_save, "--async-save"),
                             (self.save_on_rendezvous_change, "--save-on-rendezvous-change")):
            if given and not self.save:
                raise ValueError(f"{needs} needs --save DIR")
        if self.finetune and not self.load:
            raise ValueError("--finetune needs --load DIR")
        if self.use_checkpoint_args and not self.load:
            raise ValueError("--use-checkpoint-args needs --load DIR")


@dataclass
class LoggingConfig:
    log_interval: int = flag(1, help="a log line every N iterations", check=positive)
    log_json: str | None = flag(None, help="also write each log record as a JSON line to this file")
    wandb_project: str | None = flag(None, help="log to this wandb project")
    wandb_exp_name: str | None = flag(None, help="wandb run name")
    wandb_mode: str | None = flag(None, help="wandb mode", choices=("online", "offline", "disabled"),
                                  default_text="offline without WANDB_API_KEY")
    wandb_save_dir: str | None = flag(None, help="wandb's local directory")
    tensorboard_dir: str | None = flag(None, help="write tensorboard scalars here")
    log_params_norm: bool = flag(False, help="log the L2 norm of the parameters (fp32 masters): one more "
                                             "collective per log line")
    log_num_zeros_in_grad: bool = flag(False, help="log how many entries of the reduced gradient are exactly "
                                                   "zero: one more collective per step")
    log_sample_ids: bool = flag(False, help="add to each --log-json record the dataset indices of the samples its "
                                            "steps trained on (sample_ids, in global-batch order, gathered over DP): "
                                            "one more collective per step; shows that a resumed or elastic run "
                                            "neither skips nor repeats a sample")
    log_throughput: bool = flag(False, help="add tokens/s, TFLOP/s per device and MFU to the console line "
                                            "(the --log-json record always has them)")
    log_timers_to_tensorboard: bool = flag(False, help="write the iteration time (and, with --log-throughput, "
                                                       "the throughput) to tensorboard / wandb")
    log_memory_to_tensorboard: bool = flag(False, help="write the peak memory to tensorboard / wandb")
    log_validation_ppl_to_tensorboard: bool = flag(False, help="write the validation perplexity to "
                                                               "tensorboard / wandb")
    peak_tflops: float | None = flag(None, name="--peak-tflops-per-device", help="peak dense bf16 TFLOP/s of one "
                                     "device, for the MFU", check=positive,
                                     default_text="by CUDA device name (A100, H100, H200, B200); none elsewhere")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    execution: ExecutionConfig
    optimizer: OptimizerConfig
    schedule: LRSchedule
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    eod_token_id: int | None = None  # the tokenizer's end-of-document id (None with --mock-data)
    args: dict = field(default_factory=dict)  # the parsed flags, saved with checkpoints
    notices: list[str] = field(default_factory=list)  # for the log: what the Megatron-only flags given mean here

    @property
    def eod_mask_token(self) -> int | None:
        """The id whose positions get no loss (--eod-mask-loss), else None."""
        return self.eod_token_id if self.train.eod_mask_loss else None


# The flag groups of --help, in order: (title, dataclass).
FLAG_GROUPS = (
    ("model architecture", ModelConfig),
    ("parallelism", ParallelConfig),
    ("execution (memory and speed; the function computed is unchanged)", ExecutionConfig),
    ("optimizer and precision", OptimizerConfig),
    ("learning-rate schedule", LRSchedule),
    ("batch, run and evaluation", TrainConfig),
    ("data", DataConfig),
    ("checkpoints", CheckpointConfig),
    ("logging", LoggingConfig),
)
