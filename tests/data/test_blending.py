"""Blending: every prefix of the blend holds each dataset in its weight's proportion to within
a sample, the order does not depend on how many samples are built, and the m-th sample taken
from a dataset is that dataset's sample m."""

import numpy as np
import pytest
import torch

from megamoe.data.blending import blend_schedule, load_blend_schedule, normalize_weights
from megamoe.data.build import DataConfig, build_train_valid_test_datasets
from megamoe.data.indexed_dataset import IndexedDatasetWriter


def _prefix_deviation(owners, weights):
    onehot = np.zeros((len(owners), len(weights)))
    onehot[np.arange(len(owners)), owners] = 1
    ideal = np.outer(np.arange(1, len(owners) + 1), weights)
    return np.abs(onehot.cumsum(0) - ideal).max()


@pytest.mark.parametrize("raw", [[0.7, 0.3], [1, 2], [0.001, 0.999], [5, 3, 2], [0.01, 0.2, 0.79], [1, 1, 1]])
def test_every_prefix_holds_the_weights_to_within_one_sample(raw):
    w = normalize_weights(raw)
    owners, ranks = blend_schedule(w, 5000)
    assert _prefix_deviation(owners, w) < (0.5 + 1e-9 if len(w) == 2 else 1.0)
    for d in range(len(w)):
        assert ranks[owners == d].tolist() == list(range(int((owners == d).sum())))


def test_round_proportions_come_out_exactly():
    owners, _ = blend_schedule(normalize_weights([0.7, 0.3]), 1000)
    assert np.bincount(owners).tolist() == [700, 300]
    owners, _ = blend_schedule(normalize_weights([0.5, 0.25, 0.25]), 1000)
    assert np.bincount(owners).tolist() == [500, 250, 250]


def test_many_skewed_datasets_stay_within_the_stated_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = normalize_weights(rng.random(6) ** 3 + 1e-3)
        owners, _ = blend_schedule(w, 3000)
        onehot = np.zeros((3000, 6))
        onehot[np.arange(3000), owners] = 1
        deviation = np.abs(onehot.cumsum(0) - np.outer(np.arange(1, 3001), w)).max(axis=0)
        assert np.all(deviation <= 0.5 + w * 6 / 2 + 1e-9)


def test_the_order_of_a_prefix_does_not_depend_on_the_total():
    w = normalize_weights([0.2, 0.5, 0.3])
    full = blend_schedule(w, 3001)
    for n in (1, 2, 17, 1000):
        np.testing.assert_array_equal(blend_schedule(w, n), full[:, :n])


def test_weights_must_be_positive():
    for bad in ([0.5, 0.0], [-1, 2], [float("nan"), 1], []):
        with pytest.raises(ValueError, match="--data-path"):
            normalize_weights(bad)


def _write(prefix, token, num_docs):
    # Every token of dataset ``token`` is ``token``, so a sample tells where it came from.
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for i in range(num_docs):
            w.add_document(np.full(5 + i % 4, token, dtype=np.uint16))
    return str(prefix)


def test_blended_datasets_draw_each_source_in_proportion(tmp_path):
    a, b = _write(tmp_path / "a", 1, 300), _write(tmp_path / "b", 2, 100)
    config = DataConfig(["0.7", a, "0.3", b], split="1", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(
        config, train_samples=1000, valid_samples=0, test_samples=0, seq_length=8, seed=0)
    assert valid is None and test is None and len(train) == 1000
    sources = [int(train[i]["tokens"][0]) for i in range(1000)]
    assert sources.count(1) == 700 and sources.count(2) == 300
    owners, ranks = train.schedule
    for i in (0, 1, 500, 999):
        part = train.datasets[int(owners[i])]
        assert torch.equal(train[i]["tokens"], part[int(ranks[i])]["tokens"])


def test_the_schedule_is_cached_and_reused(tmp_path, monkeypatch):
    from megamoe.data import blending

    first = load_blend_schedule([1, 3], 100, cache_dir=str(tmp_path), name="x")
    monkeypatch.setattr(blending, "blend_schedule", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = load_blend_schedule([1, 3], 100, cache_dir=str(tmp_path), name="x")
    np.testing.assert_array_equal(first, again)


def test_prefixes_without_weights_blend_by_their_token_counts(tmp_path):
    """``--data-path a b`` (Megatron's unweighted list): each dataset weighs its number of tokens."""
    a, b = _write(tmp_path / "a", 1, 300), _write(tmp_path / "b", 2, 100)  # 1950 and 650 tokens: 3 to 1
    config = DataConfig([a, b], split="1", cache_dir=str(tmp_path / "cache"))
    assert config.weights is None and config.prefixes == [a, b]
    train, _, _ = build_train_valid_test_datasets(
        config, train_samples=1000, valid_samples=0, test_samples=0, seq_length=8, seed=0)
    sources = [int(train[i]["tokens"][0]) for i in range(1000)]
    assert sources.count(1) == 750 and sources.count(2) == 250
