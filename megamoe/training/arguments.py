"""Command-line flags (Megatron's names) -> validated config dataclasses, in one place.

``parse_config(argv, world_size)`` parses and validates everything that can be checked before
any process group exists, and raises ``ConfigError`` (one line, naming the flags) otherwise.
``pretrain_moe.py`` turns that into ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from dataclasses import dataclass, field

import torch

from megamoe.data.build import DataConfig, parse_data_path
from megamoe.int_list import IntListAction, parse_int_list
from megamoe.model.config import ModelConfig
from megamoe.optim import OptimizerConfig
from megamoe.parallel.state import validate_parallel_sizes
from megamoe.training.lr_schedule import LRSchedule


class ConfigError(ValueError):
    """A user's invalid flag combination; the message names the flags."""


@dataclass
class ParallelConfig:
    world_size: int
    tensor_model_parallel_size: int = 1  # --tensor-model-parallel-size
    use_distributed_optimizer: bool = False  # --use-distributed-optimizer

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_model_parallel_size


@dataclass
class TrainConfig:
    micro_batch_size: int  # --micro-batch-size
    global_batch_size: int  # --global-batch-size
    train_iters: int  # --train-iters
    seq_length: int  # --seq-length
    seed: int = 1234  # --seed
    eval_interval: int = 0  # --eval-interval (0: no periodic eval)
    eval_iters: int = 10  # --eval-iters
    device: str = "cpu"  # --device
    exit_signal_handler: bool = False  # --exit-signal-handler
    compile: bool = False  # --compile: regional torch.compile (megamoe.model.compile)
    eod_mask_loss: bool = False  # --eod-mask-loss: no loss on positions whose input token is EOD
    num_microbatches: int = 1  # derived: GBS / (MBS x DP)


@dataclass
class CheckpointConfig:
    save: str | None = None  # --save
    load: str | None = None  # --load
    save_interval: int = 0  # --save-interval (0: only at the end, when --save is set)
    keep_last: int = 0  # --keep-last (0: keep all)
    finetune: bool = False  # --finetune: load weights only, reset iteration/optimizer/data position
    no_load_optim: bool = False  # --no-load-optim
    no_load_rng: bool = False  # --no-load-rng


@dataclass
class LoggingConfig:
    log_interval: int = 1  # --log-interval
    log_json: str | None = None  # --log-json
    wandb_project: str | None = None  # --wandb-project
    wandb_exp_name: str | None = None  # --wandb-exp-name
    wandb_mode: str | None = None  # --wandb-mode (online/offline/disabled; default offline without an API key)
    wandb_save_dir: str | None = None  # --wandb-save-dir
    tensorboard_dir: str | None = None  # --tensorboard-dir
    peak_tflops: float | None = None  # --peak-tflops-per-device (default: 989 on CUDA, none on CPU)


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    schedule: LRSchedule
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    tokenizer_model: str | None = None
    eod_token_id: int | None = None  # the tokenizer's end-of-document id (None with --mock-data)
    args: dict = field(default_factory=dict)  # the parsed flags, saved with checkpoints

    @property
    def eod_mask_token(self) -> int | None:
        """The id whose positions get no loss (--eod-mask-loss), else None."""
        return self.eod_token_id if self.train.eod_mask_loss else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description="Pretrain a (Mixture-of-Experts) GPT with tensor, data and expert parallelism.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--kv-channels", type=int, default=None, help="head dim (default: --hidden-size / --num-attention-heads)")
    g.add_argument("--group-query-attention", action="store_true", help="fewer key/value heads: --num-query-groups")
    g.add_argument("--num-query-groups", type=int, default=None, help="key/value heads with --group-query-attention (1)")
    g.add_argument("--qk-layernorm", action="store_true", help="a --normalization over each head's query and key")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--normalization", default="RMSNorm", help="RMSNorm or LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs and experts (else GeLU)")
    g.add_argument("--position-embedding-type", default="rope", help="rope or learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--vocab-size", type=int, default=None, help="with --mock-data only (else: the tokenizer's)")
    g.add_argument("--recompute-granularity", default=None, help="full: recompute each layer's activations in backward")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="with --recompute-granularity: the first N layers")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", action=IntListAction, default=None,
                   help="one value, or one per MoE layer (space- or comma-separated)")
    g.add_argument("--moe-layer-freq", default="1", help="every N-th layer is MoE, or a 0/1 pattern per layer: 1,0,1,0")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--no-moe-router-renormalize", action="store_true")
    g.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"])
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing: a per-expert bias in the top-k choice (sigmoid scores)")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=None,
                   help="expert-bias step per optimizer step (default 1e-3)")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the top-k weights by this")
    g.add_argument("--moe-router-num-groups", type=int, default=None, help="expert groups for group-limited routing")
    g.add_argument("--moe-router-group-topk", type=int, default=None, help="groups each token may route to")
    g.add_argument("--moe-input-jitter-eps", type=float, default=0.0)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="unset: dropless")
    g.add_argument("--moe-eval-capacity-factor", type=float, default=None)
    g.add_argument("--moe-token-drop-policy", default="probs", help="probs or position")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--no-moe-grouped-gemm", action="store_true")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", action=IntListAction, default=[1],
                   help="one value, or one per MoE layer (space- or comma-separated)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO-1")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="launch each gradient bucket's reduction during the last micro-batch's backward")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale (unset: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", help="constant, linear, cosine or wsd")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="default: 10%% of --lr-decay-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="prefix, or weight prefix weight prefix ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on positions whose input token is EOD")
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--keep-last", type=int, default=0)
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-signal-handler", action="store_true", help="save and exit on SIGTERM")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-json", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-tflops-per-device", type=float, default=None)

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--compile", action="store_true", help="regional torch.compile of attention, norms, MLPs")
    return p


def _from_flags(cls, args: argparse.Namespace, **derived):
    """A ``cls`` dataclass whose fields take the flag of the same name (``--hidden-size`` ->
    ``hidden_size``), then ``derived`` for the fields a flag does not give as is."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**values, **derived})


def _positive(flags: dict[str, int | float | None]) -> None:
    for flag, value in flags.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")


def _non_negative(flags: dict[str, int | float]) -> None:
    for flag, value in flags.items():
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")


def _moe_layer_freq(text: str) -> int | tuple[int, ...]:
    try:
        values = parse_int_list(text)
    except ValueError:
        raise ConfigError(f"--moe-layer-freq {text!r}: give an integer N or a 0/1 pattern like 1,0,1,0") from None
    return values[0] if len(values) == 1 else tuple(values)


def parse_config(argv: list[str] | None = None, *, world_size: int | None = None) -> RunConfig:
    """Parse and validate; raises ``ConfigError`` before anything is built."""
    args = build_parser().parse_args(argv)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return _build(args, world_size)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _build(args: argparse.Namespace, world_size: int) -> RunConfig:
    _positive({
        "--micro-batch-size": args.micro_batch_size,
        "--global-batch-size": args.global_batch_size,
        "--train-iters": args.train_iters,
        "--seq-length": args.seq_length,
        "--log-interval": args.log_interval,
        "--eval-iters": args.eval_iters,
    })
    _non_negative({
        "--save-interval": args.save_interval,
        "--keep-last": args.keep_last,
        "--eval-interval": args.eval_interval,
        "--lr-warmup-iters": args.lr_warmup_iters,
        "--clip-grad": args.clip_grad,
        "--weight-decay": args.weight_decay,
    })
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if args.compile and args.recompute_granularity:
        raise ConfigError(
            "--compile and --recompute-granularity cannot be combined yet (the recomputation re-enters the "
            "compiled regions with a different graph, which torch.utils.checkpoint refuses); use one of them"
        )
    params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but CUDA is not available; use --device cpu")

    parallel = ParallelConfig(
        world_size=world_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    validate_parallel_sizes(
        world_size=world_size,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        expert_model_parallel_sizes=args.expert_model_parallel_size,
    )
    dp = parallel.data_parallel_size

    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {args.micro_batch_size} "
            f"x data-parallel size {dp} (world {world_size} / --tensor-model-parallel-size "
            f"{parallel.tensor_model_parallel_size}); use a multiple of {args.micro_batch_size * dp}"
        )
    train = _from_flags(
        TrainConfig, args, global_batch_size=global_batch, device=device,
        num_microbatches=global_batch // (args.micro_batch_size * dp),
    )

    tokenizer_model, vocab_size, eod_token_id, data = _resolve_data(args)
    if args.eod_mask_loss and eod_token_id is None:
        raise ConfigError("--eod-mask-loss needs real data and its tokenizer, not --mock-data")
    max_pos = args.max_position_embeddings or args.seq_length
    if args.seq_length > max_pos:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {max_pos}")
    model = _from_flags(
        ModelConfig,
        args,
        vocab_size=vocab_size,
        max_position_embeddings=max_pos,
        add_bias_linear=not args.disable_bias_linear,
        params_dtype=params_dtype,
        num_experts=tuple(args.num_experts or ()),
        moe_layer_freq=_moe_layer_freq(args.moe_layer_freq),
        moe_router_renormalize=not args.no_moe_router_renormalize,
        moe_grouped_gemm=not args.no_moe_grouped_gemm,
        expert_model_parallel_size=tuple(args.expert_model_parallel_size),
    )
    if not model.num_experts and args.expert_model_parallel_size != [1]:
        raise ConfigError("--expert-model-parallel-size needs --num-experts (the model has no MoE layer)")
    model.check_parallel_layout(tensor_model_parallel_size=parallel.tensor_model_parallel_size, data_parallel_size=dp)

    decay_iters = args.lr_decay_iters or args.train_iters
    schedule = LRSchedule(
        lr=args.lr,
        min_lr=args.min_lr,
        decay_style=args.lr_decay_style,
        warmup_iters=args.lr_warmup_iters,
        decay_iters=decay_iters,
        wsd_decay_iters=args.lr_wsd_decay_iters or max(1, decay_iters // 10),
    )
    optimizer = _from_flags(OptimizerConfig, args, params_dtype=params_dtype)

    checkpoint = _from_flags(CheckpointConfig, args)
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save DIR")
    if args.keep_last and not args.save:
        raise ConfigError("--keep-last needs --save DIR")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load DIR")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise ConfigError(f"--save {args.save} exists and is not a directory")

    logging = _from_flags(
        LoggingConfig, args, peak_tflops=args.peak_tflops_per_device or (989.0 if device == "cuda" else None)
    )
    if args.log_json:
        parent = os.path.dirname(os.path.abspath(args.log_json))
        if not os.path.isdir(parent):
            raise ConfigError(f"--log-json {args.log_json}: directory {parent} does not exist")
    if args.tensorboard_dir:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
    if args.wandb_project:
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package: pip install wandb") from None

    return RunConfig(
        model=model,
        parallel=parallel,
        optimizer=optimizer,
        schedule=schedule,
        data=data,
        train=train,
        checkpoint=checkpoint,
        logging=logging,
        tokenizer_model=tokenizer_model,
        eod_token_id=eod_token_id,
        args=vars(args),
    )


def _resolve_data(args: argparse.Namespace) -> tuple[str | None, int, int | None, DataConfig]:
    """Pick the data source: --mock-data, --data-path with --tokenizer-model, or the built-in corpus.
    Returns the tokenizer model, the vocabulary size, the EOD id and the data config."""
    if args.mock_data:
        if args.data_path:
            raise ConfigError("--mock-data and --data-path are mutually exclusive")
        vocab = args.vocab_size or 32000
        _positive({"--vocab-size": vocab})
        return None, vocab, None, DataConfig(data_path=[], split=args.split, mock_data=True, vocab_size=vocab,
                                             cache_dir=args.data_cache_path)
    if args.vocab_size is not None:
        raise ConfigError("--vocab-size is only for --mock-data; otherwise the tokenizer sets it")
    if args.data_path:
        if not args.tokenizer_model:
            raise ConfigError("--data-path needs --tokenizer-model (the sentencepiece model the data was made with)")
        prefixes = _check_data_paths(args.data_path)
        tokenizer_model = args.tokenizer_model
    else:
        if args.tokenizer_model:
            raise ConfigError("--tokenizer-model without --data-path: give --data-path too, or neither for the built-in corpus")
        from megamoe.data.default_corpus import ensure_default_corpus

        prefix, tokenizer_model = ensure_default_corpus()
        args.data_path, prefixes = [prefix], [prefix]
    if not os.path.isfile(tokenizer_model):
        raise ConfigError(f"--tokenizer-model {tokenizer_model}: no such file")
    from megamoe.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_model)
    _check_token_ids(prefixes, tokenizer_model, tokenizer.vocab_size)
    data = DataConfig(data_path=list(args.data_path), split=args.split, mock_data=False, vocab_size=None,
                      cache_dir=args.data_cache_path)
    return tokenizer_model, tokenizer.vocab_size, tokenizer.eod_id, data


def _check_token_ids(prefixes: list[str], tokenizer_model: str, vocab_size: int) -> None:
    """Refuse data whose ids do not fit the tokenizer (made with another one): it would crash
    the embedding lookup, on CUDA with an opaque device-side assert."""
    from megamoe.data.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        largest = IndexedDataset(prefix).sample_max_token()
        if largest >= vocab_size:
            raise ConfigError(
                f"--data-path {prefix} holds token id {largest} but --tokenizer-model {tokenizer_model} has "
                f"{vocab_size} ids: the data was made with another tokenizer"
            )


def _check_data_paths(data_path: list[str]) -> list[str]:
    """The dataset prefixes of --data-path, each with its .bin and .idx present."""
    _, prefixes = parse_data_path(data_path)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"--data-path {prefix}: {prefix + suffix} does not exist")
    return prefixes
