"""GPT samples: documents concatenated and cut into ``seq_length + 1`` tokens, and mock samples.

Sample order (one split of one indexed dataset, documents ``[first, last)``):

* Epoch ``e`` shuffles the split's documents with a generator seeded by ``(seed, e)`` and
  concatenates them into one token stream of ``T`` tokens (the same ``T`` every epoch).
* The stream is cut into ``S = (T - 1) // seq_length`` samples; sample ``c`` is tokens
  ``[c * seq_length, c * seq_length + seq_length + 1)`` (neighbours share one token, so every
  token of the stream is a label exactly once).  The < seq_length tokens left at the end of an
  epoch are dropped, which keeps each epoch self-contained.
* The epoch's ``S`` cuts are shuffled by a second generator seeded by ``(seed, e)``; global
  sample ``i`` is cut ``shuffle_e[i % S]`` of epoch ``e = i // S``.

So sample ``i`` is a pure function of (seed, data, split, seq_length, i): neither the number of
samples asked for, nor DP size, nor resuming changes it, and training longer only appends
epochs.  Shuffles use argsort of raw PCG64 output, whose stream numpy keeps stable across
versions.  Each epoch's arrays ``[document order | document end offsets | cut order]`` are
cached (megamoe/data/index_cache.py) and keyed by the split's document lengths, so changed data
or parameters rebuild them.

A sample is ``{"tokens": x[:-1], "labels": x[1:], "loss_mask": ones}`` with ``x`` its
``seq_length + 1`` tokens (int64 tensors; loss_mask float32).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megamoe.data.index_cache import cache_key, load_or_build
from megamoe.data.indexed_dataset import IndexedDataset

# Streams of the seeded generators: which shuffle a generator draws.
_DOCUMENT_SHUFFLE, _SAMPLE_SHUFFLE = 0, 1


def seeded_permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64) determined by ``key`` alone, stable across numpy versions."""
    bits = np.random.PCG64(np.random.SeedSequence(list(key))).random_raw(n)
    return np.argsort(bits, kind="stable").astype(np.int64)


def to_sample(tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """``seq_length + 1`` token ids -> the training sample dict (tokens, labels, loss_mask)."""
    x = torch.from_numpy(tokens.astype(np.int64))
    return {"tokens": x[:-1], "labels": x[1:], "loss_mask": torch.ones(len(x) - 1, dtype=torch.float32)}


class GPTDataset:
    """``num_samples`` samples of the documents ``[first, last)`` of ``indexed``.

    ``name`` labels the cache files; ``cache_dir`` holds them.  Raises ValueError naming the
    file if the split holds fewer than ``seq_length + 1`` tokens, or if the dataset has
    documents made of several sequences (GPT samples take one sequence per document).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        documents: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str,
        name: str,
    ):
        first, last = documents
        if len(indexed.document_indices) != len(indexed) + 1:
            raise ValueError(
                f"indexed dataset {indexed.prefix}.idx: documents of several sequences are not supported "
                "for GPT samples; preprocess with tools/preprocess_data.py"
            )
        self.indexed = indexed
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.first_document = first
        lengths = indexed.sequence_lengths[first:last]
        num_tokens = int(lengths.sum(dtype=np.int64))
        self.samples_per_epoch = max(num_tokens - 1, 0) // seq_length
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"indexed dataset {indexed.prefix}: the {name} split (documents {first}..{last}) holds "
                f"{num_tokens} tokens, too few for one sample of --seq-length {seq_length} + 1; change --split"
            )
        key = cache_key("gpt", lengths, first, seq_length, seed)
        num_docs = last - first
        shape = (2 * num_docs + self.samples_per_epoch,)
        self._epochs = [
            load_or_build(cache_dir, f"{name}-epoch{e}", key, shape, lambda e=e: self._build_epoch(lengths, seed, e))
            for e in range(-(-num_samples // self.samples_per_epoch))
        ]
        self._num_docs = num_docs

    def _build_epoch(self, lengths: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        order = seeded_permutation(len(lengths), seed, epoch, _DOCUMENT_SHUFFLE)
        ends = np.cumsum(lengths[order], dtype=np.int64)
        cuts = seeded_permutation(self.samples_per_epoch, seed, epoch, _SAMPLE_SHUFFLE)
        return np.concatenate([order + self.first_document, ends, cuts])

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order as global document ids, end offset of each in the epoch stream,
        cut index of each of the epoch's samples) of ``epoch``."""
        plan, d = self._epochs[epoch], self._num_docs
        return plan[:d], plan[d : 2 * d], plan[2 * d :]

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids of sample ``index`` (numpy, the file's dtype)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        epoch, k = divmod(index, self.samples_per_epoch)
        order, ends, cuts = self.epoch_plan(epoch)
        start = int(cuts[k]) * self.seq_length
        need = self.seq_length + 1
        position = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[position - 1]) if position else 0)
        pieces = []
        while need:
            doc = int(order[position])
            take = min(need, int(self.indexed.sequence_lengths[doc]) - offset)
            pieces.append(self.indexed.get(doc, offset, take))
            need -= take
            position, offset = position + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return to_sample(self.sample_tokens(index))


class MockGPTDataset:
    """``num_samples`` samples of uniform random ids in ``[0, vocab_size)``; sample ``i`` is drawn
    from a generator seeded by ``(seed, stream, i)`` so it too is a pure function of ``i``.
    ``stream`` tells train (0), valid (1) and test (2) apart."""

    def __init__(self, *, num_samples: int, seq_length: int, vocab_size: int, seed: int, stream: int):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.stream, index])))
        return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return to_sample(self.sample_tokens(index))


def default_cache_dir(prefix: str) -> str:
    """Where index arrays go when no --data-cache-path is given: beside the data."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")
