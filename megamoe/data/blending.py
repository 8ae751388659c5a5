"""Weighted blending of several sample datasets with exact proportions.

Dataset ``k`` with normalised weight ``w_k`` gets its ``m``-th sample at the ideal time
``(m + 0.5) / w_k``; the blend lists all datasets' samples by ideal time (ties to the lower
``k``).  This is stride scheduling (Webster rounding): when the ``n``-th blended sample has
time ``t``, dataset ``k`` has contributed ``round(w_k * t)`` samples.  Over any prefix of ``n``
samples each dataset's count is within half a sample of ``w_k * n`` for two datasets, within
one for three (checked on thousands of random weights), and within ``1/2 + w_k * K / 2`` for
``K`` datasets (about 2 at worst for skewed weights): the proportions hold to a sample or two at
every point of training, not just on average.  Megatron's greedy gets within about one sample for any ``K`` but is a sequential loop
(C++ there); this order is a sort, fast in numpy for hundreds of millions of samples.

The order of the first ``n`` samples does not depend on how many are built, so blended sample
``i`` is, like its parts, a pure function of ``i``; the ``m``-th sample taken from dataset
``k`` is that dataset's sample ``m``.
"""

from __future__ import annotations

import numpy as np
import torch

from megamoe.data.gpt_dataset import to_sample
from megamoe.data.index_cache import cache_key, load_or_build


def normalize_weights(weights) -> np.ndarray:
    """Weights as float64 summing to 1; ValueError naming --data-path unless all are positive."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"--data-path: blending weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def blend_schedule(weights: np.ndarray, num_samples: int) -> np.ndarray:
    """``[2, num_samples]`` int64: row 0 the dataset of each blended sample, row 1 its index
    within that dataset.  ``weights`` must be normalised."""
    k = len(weights)
    # With every time <= horizon generated, at least num_samples times are <= horizon (each
    # dataset has >= w_k * horizon - 0.5 of them), so the first num_samples are all present.
    horizon = num_samples + k / 2 + 1
    times, owners, ranks = [], [], []
    for d, w in enumerate(weights):
        count = int(np.floor(w * horizon + 0.5)) + 1
        m = np.arange(count, dtype=np.int64)
        times.append((m + 0.5) / w)
        owners.append(np.full(count, d, dtype=np.int64))
        ranks.append(m)
    times, owners, ranks = (np.concatenate(x) for x in (times, owners, ranks))
    order = np.lexsort((owners, times))[:num_samples]
    assert len(order) == num_samples
    return np.stack([owners[order], ranks[order]])


def load_blend_schedule(weights, num_samples: int, *, cache_dir: str, name: str) -> np.ndarray:
    """``blend_schedule`` of the normalised ``weights``, cached in ``cache_dir`` under ``name``."""
    weights = normalize_weights(weights)
    key = cache_key("blend", weights, num_samples)
    return load_or_build(cache_dir, f"{name}-blend", key, (2, num_samples), lambda: blend_schedule(weights, num_samples))


class BlendedDataset:
    """The samples of ``datasets`` in the order of ``schedule`` (from ``load_blend_schedule``);
    ``datasets[k]`` must hold at least as many samples as the schedule takes from it."""

    def __init__(self, datasets: list, schedule: np.ndarray):
        counts = np.bincount(np.asarray(schedule[0]), minlength=len(datasets))
        for d, (dataset, need) in enumerate(zip(datasets, counts)):
            assert len(dataset) >= need, (d, len(dataset), need)
        self.datasets = datasets
        self.schedule = schedule
        self.num_samples = schedule.shape[1]

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        return self.datasets[int(self.schedule[0, index])].sample_tokens(int(self.schedule[1, index]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return to_sample(self.sample_tokens(index))
