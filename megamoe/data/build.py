"""From --data-path / --split / --mock-data to train, valid and test datasets and DP batches.

    config = DataConfig(data_path=["0.7", "data/web", "0.3", "data/code"], split="969,30,1")
    train, valid, test = build_train_valid_test_datasets(
        config, train_samples=iters * gbs, valid_samples=evals * gbs, test_samples=gbs,
        seq_length=2048, seed=1234)
    for micro in micro_batches(train, global_batch_size=gbs, micro_batch_size=mbs,
                               dp_rank=dp_rank, dp_size=dp_size, start_sample=consumed_samples):
        ...  # micro: this rank's micro-batches of one global batch

The split is by documents of each dataset (Megatron's rule: cumulative rounded fractions);
blending then mixes the same split of every dataset with the --data-path weights.  The data
never touches process groups: callers pass their DP rank and size as numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.data.blending import BlendedDataset, load_blend_schedule, normalize_weights
from megamoe.data.gpt_dataset import GPTDataset, MockGPTDataset, default_cache_dir
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.tokenizer import TOKENIZER_TYPES
from megamoe.flags import check_fields, flag

SPLIT_NAMES = ("train", "valid", "test")


MOCK_VOCAB_SIZE = 32000


@dataclass
class DataConfig:
    """Where samples come from.  ``__post_init__`` validates; errors name the flag."""

    data_path: list[str] | None = flag(
        help="dataset prefix (without .bin/.idx); weight prefix weight prefix ...; or prefix prefix ... "
             "(weighted by their token counts)", nargs="+",
        default_text="the built-in corpus")
    split: str = flag("969,30,1", help="relative sizes of train, valid, test, by documents (comma or slash "
                                       "separated)")
    mock_data: bool = flag(False, help="random tokens instead of files")
    vocab_size: int | None = flag(None, help="with --mock-data: ids are drawn from [0, N) (else: the tokenizer's)",
                                  default_text=f"{MOCK_VOCAB_SIZE} with --mock-data")
    cache_dir: str | None = flag(None, name="--data-cache-path", help="where index arrays are cached",
                                 default_text="index_cache beside each dataset")
    tokenizer_type: str | None = flag(None, help="the kind of --tokenizer-model (Megatron's names): a sentencepiece "
                                                 ".model file, or a Hugging Face tokenizer directory or hub name",
                                      choices=TOKENIZER_TYPES, default_text="SentencePieceTokenizer")
    tokenizer_model: str | None = flag(None, help="the tokenizer the data was made with (see --tokenizer-type)",
                                       default_text="the built-in corpus's")

    def __post_init__(self) -> None:
        check_fields(self)
        self.split_fractions = parse_split(self.split)
        if self.mock_data:
            if self.data_path:
                raise ValueError("--mock-data and --data-path are mutually exclusive")
            if self.vocab_size is None or self.vocab_size < 1:
                raise ValueError(f"--mock-data needs a positive vocabulary size, got {self.vocab_size}")
        else:
            if self.vocab_size is not None:
                raise ValueError("--vocab-size is only for --mock-data; otherwise the tokenizer sets it")
            self.weights, self.prefixes = parse_data_path(self.data_path)


def parse_split(split: str) -> list[float]:
    """"969,30,1" -> normalised [train, valid, test] fractions (missing trailing parts are 0)."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split}: expected up to three numbers like 969,30,1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 or not np.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split}: expected up to three non-negative numbers like 969,30,1")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(data_path: list[str]) -> tuple[list[float] | None, list[str]]:
    """Megatron's --data-path forms -> (weights, prefixes): ``[p]``, ``[w1, p1, w2, p2, ...]``, or
    ``[p1, p2, ...]`` without weights (None: each dataset weighs its number of tokens, so one
    pass over the blend reads each dataset once, as Megatron's unweighted list does)."""
    if not data_path:
        raise ValueError("--data-path: give a dataset prefix (or --mock-data)")
    if len(data_path) == 1:
        return [1.0], list(data_path)
    if not any(_is_number(part) for part in data_path):
        return None, list(data_path)
    if len(data_path) % 2 or not all(_is_number(w) for w in data_path[0::2]):
        raise ValueError(
            f"--data-path {' '.join(data_path)}: expected weight prefix pairs (weights first), or prefixes "
            "without weights"
        )
    return normalize_weights([float(w) for w in data_path[0::2]]).tolist(), list(data_path[1::2])


def split_ranges(num_documents: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Document ranges of train, valid, test: Megatron's cumulative rounding, last one adjusted
    so the ranges cover exactly ``[0, num_documents)``."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(max(bounds[i], 0), bounds[i + 1]) for i in range(3)]


def build_train_valid_test_datasets(
    data_config: DataConfig, *, train_samples: int, valid_samples: int, test_samples: int, seq_length: int, seed: int
):
    """(train, valid, test) datasets of exactly the requested numbers of samples.

    Each dataset maps ``ds[i]`` to ``{"tokens", "labels": LongTensor[seq_length], "loss_mask":
    FloatTensor[seq_length]}``; ``ds[i]`` depends only on (seed, data, split, seq_length, i).
    A split asked for 0 samples is None, and so is a validation or test split that ``--split``
    leaves without documents (in every dataset): Megatron then skips evaluation.  Raises
    ValueError naming the flag when the train split, or a split of some of the datasets only,
    asked for samples has no documents, or too few tokens, or a file is missing/corrupt.
    """
    if seq_length < 1:
        raise ValueError(f"--seq-length {seq_length}: must be positive")
    if seed < 0:
        raise ValueError(f"--seed {seed}: must be non-negative")
    counts = (train_samples, valid_samples, test_samples)
    if any(c < 0 for c in counts):
        raise ValueError(f"sample counts must be non-negative, got {counts}")
    if data_config.mock_data:
        return tuple(
            MockGPTDataset(num_samples=n, seq_length=seq_length, vocab_size=data_config.vocab_size, seed=seed, stream=s)
            if n else None
            for s, n in enumerate(counts)
        )
    indexed = [IndexedDataset(prefix) for prefix in data_config.prefixes]
    weights = data_config.weights
    if weights is None:
        weights = normalize_weights([ds.num_tokens for ds in indexed]).tolist()
    result = []
    for s, (name, num_samples) in enumerate(zip(SPLIT_NAMES, counts)):
        if num_samples == 0 or (name != "train" and all(_empty(ds, data_config, s) for ds in indexed)):
            result.append(None)
            continue
        if len(indexed) == 1:
            result.append(_split_dataset(indexed[0], data_config, s, name, num_samples, seq_length, seed))
            continue
        cache_dir = data_config.cache_dir or default_cache_dir(data_config.prefixes[0])
        schedule = load_blend_schedule(weights, num_samples, cache_dir=cache_dir, name=name)
        per_dataset = np.bincount(np.asarray(schedule[0]), minlength=len(indexed))
        parts = [
            _split_dataset(ds, data_config, s, name, int(n), seq_length, seed) for ds, n in zip(indexed, per_dataset)
        ]
        result.append(BlendedDataset(parts, schedule))
    return tuple(result)


def _empty(indexed: IndexedDataset, config: DataConfig, s: int) -> bool:
    first, last = split_ranges(len(indexed), config.split_fractions)[s]
    return last <= first


def _split_dataset(indexed: IndexedDataset, config: DataConfig, s: int, name: str, num_samples: int, seq_length: int, seed: int):
    first, last = split_ranges(len(indexed), config.split_fractions)[s]
    if last <= first:
        raise ValueError(
            f"--split {config.split}: the {name} split of {indexed.prefix} ({len(indexed)} documents) is empty, "
            f"but {name} needs samples; give it a larger share"
        )
    return GPTDataset(
        indexed,
        documents=(first, last),
        num_samples=num_samples,
        seq_length=seq_length,
        seed=seed,
        cache_dir=config.cache_dir or default_cache_dir(indexed.prefix),
        name=f"{os.path.basename(indexed.prefix)}-{name}",
    )


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack sample dicts into a batch dict of ``[len(samples), seq_length]`` tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _read(dataset, indices: range) -> dict[str, torch.Tensor]:
    batch = collate([dataset[i] for i in indices])
    batch["sample_ids"] = torch.tensor(indices, dtype=torch.int64)
    return batch


def micro_batches(dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, start_sample: int = 0):
    """Iterate over global batches; yield this DP rank's micro-batches of each.

    Global batch ``g`` is samples ``[start_sample + g * GBS, start_sample + (g + 1) * GBS)``;
    rank ``r`` reads only its contiguous ``GBS / dp_size`` of them, split into
    ``GBS / (dp_size * micro_batch_size)`` micro-batches (dicts of ``[micro_batch_size, seq]``
    tensors, and ``sample_ids``: the ``[micro_batch_size]`` dataset indices they were read from).
    Stops before a global batch that would run past ``len(dataset)``.  Resuming with
    ``start_sample = consumed_samples`` continues the same sequence.
    """
    if global_batch_size <= 0 or micro_batch_size <= 0:
        raise ValueError(f"--global-batch-size {global_batch_size} and --micro-batch-size {micro_batch_size} must be positive")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size {micro_batch_size} "
            f"x data-parallel size {dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} must be in [0, {dp_size})")
    if start_sample < 0:
        raise ValueError(f"start_sample {start_sample} must be non-negative")
    per_rank = global_batch_size // dp_size
    start = start_sample
    while start + global_batch_size <= len(dataset):
        mine = start + dp_rank * per_rank
        yield [_read(dataset, range(first, first + micro_batch_size)) for first in range(mine, mine + per_rank, micro_batch_size)]
        start += global_batch_size
