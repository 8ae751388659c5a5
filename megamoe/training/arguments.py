"""Command-line flags (Megatron's names) -> validated config dataclasses.

The flags are derived from the config dataclasses (each field declares its flag, help, choices
and check: ``megamoe.flags``); this module adds what spans several of them.
``parse_config(argv, world_size)`` parses and validates everything that can be checked before
any process group exists, and raises ``ConfigError`` (one line, naming the flags) otherwise.
``pretrain_moe.py`` turns that into ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os

import torch

from megamoe.data.build import MOCK_VOCAB_SIZE, DataConfig
from megamoe.flags import add_flags, from_args, set_args_from
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.optim import OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout_rules import (pipeline_chunks, resolved_expert_tensor_parallel_size,
                                           validate_parallel_layout)
from megamoe.parallel.state import resolve_device
from megamoe.training.config import FLAG_GROUPS, CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
from megamoe.training.flops import peak_tflops_of
from megamoe.training.lr_schedule import LRSchedule
from megamoe.training.megatron_flags import add_megatron_flags, check_megatron_flags


class ConfigError(ValueError):
    """A user's invalid flag combination; the message names the flags."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a malformed number) are ``ConfigError``s too: one
    line without the usage text, printed once by ``pretrain_moe.py``.  Abbreviations are off (as
    in Megatron: ``--num-layer`` must not silently mean ``--num-layers``); an unknown flag names
    the closest real one."""

    def error(self, message: str):
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise ConfigError(self._unknown(unknown))
        return parsed

    def _unknown(self, unknown: list[str]) -> str:
        known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        if not flags:
            return f"unrecognized arguments: {' '.join(unknown)}"
        hints = []
        for name in flags:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return f"unrecognized argument{'s' if len(flags) > 1 else ''}: {', '.join(hints)}; see --help"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_moe.py",
        description="Pretrain a (Mixture-of-Experts) GPT with tensor, data and expert parallelism.",
        allow_abbrev=False,
    )
    for title, cls in FLAG_GROUPS:
        add_flags(p, cls, title)
    add_megatron_flags(p)
    return p


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


def _checkpoint_model_args(args: argparse.Namespace) -> None:
    """--use-checkpoint-args: the model flags of --load's checkpoint replace the command line's
    (Megatron's flag); with --mock-data and no --vocab-size, its vocabulary size too."""
    from megamoe.checkpointing.format import model_config_from_dict, read_metadata

    found = read_metadata(args.load) if os.path.isdir(args.load) else None
    if found is None:
        raise ConfigError(f"--use-checkpoint-args: --load {args.load} holds no megamoe checkpoint to take the model from")
    model = model_config_from_dict(found[1]["model_config"])
    set_args_from(model, args)
    if args.mock_data and args.vocab_size is None:
        args.vocab_size = model.vocab_size


def _build(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The dataclasses from the flags, then the checks that span several of them."""
    if args.use_checkpoint_args:
        if not args.load:
            raise ConfigError("--use-checkpoint-args needs --load DIR")
        _checkpoint_model_args(args)
    notices = check_megatron_flags(args)
    if args.compile and args.recompute_granularity == "full":
        raise ConfigError(
            "--compile and --recompute-granularity cannot be combined yet (the recomputation re-enters the "
            "compiled regions with a different graph, which torch.utils.checkpoint refuses); use one of them"
        )
    if args.multi_latent_attention and args.kv_channels is not None:
        notices.append(f"--kv-channels {args.kv_channels} with --multi-latent-attention: unused, as in Megatron "
                       f"(MLA's heads are sized by --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim)")
    parallel = from_args(ParallelConfig, args, world_size=world_size, pipeline_num_layers=args.num_layers)
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        parallel.sequence_parallel = False
        notices.append("warning: --sequence-parallel with --tensor-model-parallel-size 1 is turned off (as Megatron "
                       "does): it splits activations over the TP ranks, and there is one")
    if parallel.elastic and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            "--elastic under torchrun needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: with "
            "torch's shared agent store a node that joins a running job hangs the rendezvous (see README, Elastic "
            "training)"
        )
    validate_parallel_layout(parallel)  # before the data is opened; again below with the model's experts
    tp, dp, pp = parallel.tensor_model_parallel_size, parallel.data_parallel_size, parallel.pipeline_model_parallel_size
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {args.micro_batch_size} "
            f"x data-parallel size {dp} (world {world_size} / --tensor-model-parallel-size {tp}"
            f"{f' / --pipeline-model-parallel-size {pp}' if pp > 1 else ''}); "
            f"the nearest valid sizes are {_nearest_multiples(global_batch, args.micro_batch_size * dp)}"
        )
    train = from_args(TrainConfig, args, global_batch_size=global_batch, device=resolve_device(args.device),
                      num_microbatches=global_batch // (args.micro_batch_size * dp))

    data, vocab_size, eod_token_id = _resolve_data(args)
    if train.eod_mask_loss and eod_token_id is None:
        raise ConfigError("--eod-mask-loss needs real data and its tokenizer, not --mock-data")
    if parallel.sequence_parallel and train.seq_length % tp != 0:
        raise ConfigError(
            f"--sequence-parallel needs --seq-length {train.seq_length} divisible by --tensor-model-parallel-size {tp}"
        )
    max_pos = args.max_position_embeddings or train.seq_length
    if train.seq_length > max_pos:
        raise ConfigError(f"--seq-length {train.seq_length} exceeds --max-position-embeddings {max_pos}")
    model = from_args(ModelConfig, args, vocab_size=vocab_size, max_position_embeddings=max_pos)
    parallel.pipeline_num_microbatches = train.num_microbatches
    validate_parallel_layout(parallel, model.experts_by_layer())
    if pp > 1 and model.mtp_num_layers and model.position_embedding_type == "learned_absolute":
        raise ConfigError(f"--mtp-num-layers with --position-embedding-type learned_absolute is not supported with "
                          f"--pipeline-model-parallel-size {pp} (the last stage's MTP depths would need the position "
                          f"embeddings too); use --position-embedding-type rope")
    model.check_tensor_parallel(tensor_model_parallel_size=tp,
                                expert_tensor_parallel_size=resolved_expert_tensor_parallel_size(parallel))
    execution = from_args(ExecutionConfig, args, params_dtype=train.params_dtype)
    what = "--num-layers" if pp == 1 else "the layers of a pipeline chunk,"
    for chunk in sorted({len(c) for chunks in pipeline_chunks(parallel) for c in chunks}):
        execution.layer_chunks(chunk, what)  # --recompute-num-layers counts each pipeline chunk's layers

    optimizer = from_args(OptimizerConfig, args, params_dtype=train.params_dtype)
    schedule = from_args(LRSchedule, args, lr=optimizer.lr, min_lr=optimizer.min_lr, train_iters=train.train_iters,
                         samples_per_iteration=global_batch)
    checkpoint = from_args(CheckpointConfig, args)
    if checkpoint.save and os.path.exists(checkpoint.save) and not os.path.isdir(checkpoint.save):
        raise ConfigError(f"--save {checkpoint.save} exists and is not a directory")
    peak = args.peak_tflops_per_device
    if peak is None and train.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak_tflops_of(name)
        if peak is None:
            notices.append(f"no MFU in the log: the peak TFLOP/s of {name!r} is not known; give "
                           f"--peak-tflops-per-device")
    logging = from_args(LoggingConfig, args, peak_tflops=peak)
    _check_logging(logging)
    return RunConfig(model=model, parallel=parallel, execution=execution, optimizer=optimizer, schedule=schedule,
                     data=data, train=train, checkpoint=checkpoint, logging=logging, eod_token_id=eod_token_id,
                     args=vars(args), notices=notices)


def _nearest_multiples(value: int, step: int) -> str:
    """The multiples of ``step`` nearest to ``value`` on either side (the one above only, when
    none below is positive), for an error message."""
    below, above = value // step * step, (value // step + 1) * step
    return f"{below} and {above}" if below > 0 else str(above)


def _check_logging(logging: LoggingConfig) -> None:
    """The log file's directory exists and the logging backends asked for are installed."""
    if logging.log_json:
        parent = os.path.dirname(os.path.abspath(logging.log_json))
        if not os.path.isdir(parent):
            raise ConfigError(f"--log-json {logging.log_json}: directory {parent} does not exist")
    for given, flag, module, package in ((logging.tensorboard_dir, "--tensorboard-dir", "torch.utils.tensorboard",
                                          "tensorboard"), (logging.wandb_project, "--wandb-project", "wandb", "wandb")):
        if given:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"{flag} needs the {package} package: pip install {package}") from None


def _resolve_data(args: argparse.Namespace) -> tuple[DataConfig, int, int | None]:
    """The data source: --mock-data, --data-path with --tokenizer-model, or the built-in corpus.
    Returns the data config, the vocabulary size and the EOD id (None with --mock-data without a
    tokenizer; with one, as in Megatron, the vocabulary and EOD are the tokenizer's)."""
    from megamoe.data.tokenizer import load_tokenizer

    if args.mock_data:
        if args.tokenizer_model and not args.vocab_size:
            tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
            data = from_args(DataConfig, args, vocab_size=tokenizer.vocab_size)
            return data, data.vocab_size, tokenizer.eod_id
        data = from_args(DataConfig, args, vocab_size=args.vocab_size or MOCK_VOCAB_SIZE)
        return data, data.vocab_size, None
    if args.data_path:
        if not args.tokenizer_model:
            raise ConfigError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
        data = from_args(DataConfig, args)
    else:
        if args.tokenizer_model or args.tokenizer_type:
            raise ConfigError("--tokenizer-model/--tokenizer-type without --data-path: give --data-path too, or "
                              "neither for the built-in corpus (tokenized with its own sentencepiece model)")
        from megamoe.data.default_corpus import ensure_default_corpus

        prefix, tokenizer_model = ensure_default_corpus()
        args.data_path = [prefix]
        data = from_args(DataConfig, args, tokenizer_model=tokenizer_model)
    for prefix in data.prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                stem, ext = os.path.splitext(prefix)
                if ext in (".bin", ".idx"):
                    raise ConfigError(f"--data-path {prefix}: give the prefix without .bin/.idx (--data-path {stem}), "
                                      f"which names {stem}.bin and {stem}.idx")
                raise ConfigError(f"--data-path {prefix}: {prefix + suffix} does not exist (give the prefix of "
                                  f"PREFIX.bin and PREFIX.idx)")
    hugging_face = data.tokenizer_type == "HuggingFaceTokenizer"
    if not hugging_face and not os.path.isfile(data.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {data.tokenizer_model}: no such file")
    tokenizer = load_tokenizer(data.tokenizer_model, data.tokenizer_type)
    _check_token_ids(data.prefixes, data.tokenizer_model, tokenizer.vocab_size)
    return data, tokenizer.vocab_size, tokenizer.eod_id


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
