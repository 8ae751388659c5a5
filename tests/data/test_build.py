"""From DataConfig to datasets and per-rank micro-batches: the split follows Megatron's rule,
every DP size sees the same global batches, resuming continues the sequence, and mistakes
name their flag."""

import os

import pytest
import torch

from megamoe.data.build import DataConfig, build_train_valid_test_datasets, micro_batches, split_ranges


def _global_batches(dataset, dp_size, *, gbs=8, mbs=2, start=0, count=None):
    """For each global batch, the tokens of all its samples in order, gathered from every rank."""
    per_rank = [list(micro_batches(dataset, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=r,
                                   dp_size=dp_size, start_sample=start)) for r in range(dp_size)]
    batches = []
    for g in range(len(per_rank[0])):
        micros = [m for r in range(dp_size) for m in per_rank[r][g]]
        assert all(m["tokens"].shape == (mbs, dataset.seq_length) for m in micros)
        assert len(micros) == gbs // mbs
        batches.append(torch.cat([m["tokens"] for m in micros]))
    return batches[:count]


def test_every_dp_size_sees_the_same_global_batches(corpus_prefix, tmp_path):
    config = DataConfig([corpus_prefix], cache_dir=str(tmp_path))
    train, _, _ = build_train_valid_test_datasets(config, train_samples=48, valid_samples=0, test_samples=0,
                                                  seq_length=16, seed=5)
    one, two, four = (_global_batches(train, dp) for dp in (1, 2, 4))
    assert len(one) == 6
    for g in range(6):
        expected = torch.stack([train[i]["tokens"] for i in range(8 * g, 8 * g + 8)])
        assert torch.equal(one[g], expected) and torch.equal(two[g], expected) and torch.equal(four[g], expected)


def test_each_rank_reads_only_its_slice_and_resuming_continues_the_sequence(tmp_path):
    config = DataConfig([], mock_data=True, vocab_size=100)
    train, _, _ = build_train_valid_test_datasets(config, train_samples=40, valid_samples=0, test_samples=0,
                                                  seq_length=4, seed=0)
    read = []

    class Recording:
        seq_length = train.seq_length

        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            read.append(i)
            return train[i]

    batches = list(micro_batches(Recording(), global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=4))
    assert len(batches) == 5 and read == [i for g in range(5) for i in (8 * g + 4, 8 * g + 5)]
    assert [i for batch in batches for micro in batch for i in micro["sample_ids"].tolist()] == read
    full = _global_batches(train, 2)
    resumed = _global_batches(train, 4, start=16)
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(full[2:], resumed))


def test_batch_sizes_that_do_not_divide_are_refused_by_flag():
    ds = DataConfig([], mock_data=True, vocab_size=10)
    train, _, _ = build_train_valid_test_datasets(ds, train_samples=8, valid_samples=0, test_samples=0, seq_length=4, seed=0)
    with pytest.raises(ValueError, match="--global-batch-size 6 must be a multiple of --micro-batch-size 2 x data-parallel size 2"):
        next(micro_batches(train, global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2))
    with pytest.raises(ValueError, match="dp_rank 2"):
        next(micro_batches(train, global_batch_size=4, micro_batch_size=1, dp_rank=2, dp_size=2))


def test_split_ranges_follow_megatrons_rounding_and_cover_all_documents():
    assert split_ranges(1000, [0.969, 0.03, 0.001]) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, [0.5, 0.5, 0.0]) == [(0, 5), (5, 10), (10, 10)]
    for n in (1, 7, 333):
        ranges = split_ranges(n, [0.6, 0.3, 0.1])
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_splits_hold_disjoint_documents_and_caches_sit_beside_the_data(corpus_prefix):
    config = DataConfig([corpus_prefix], split="80,10,10")
    train, valid, test = build_train_valid_test_datasets(config, train_samples=10, valid_samples=5, test_samples=5,
                                                         seq_length=8, seed=0)
    documents = [set(ds.epoch_plan(0)[0].tolist()) for ds in (train, valid, test)]
    assert not (documents[0] & documents[1]) and not (documents[1] & documents[2]) and not (documents[0] & documents[2])
    assert os.listdir(os.path.join(os.path.dirname(corpus_prefix), "index_cache"))


def test_mock_data_has_the_same_interface(tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        DataConfig([], mock_data=True, vocab_size=37), train_samples=4, valid_samples=2, test_samples=0, seq_length=8, seed=1)
    assert (len(train), len(valid), test) == (4, 2, None)
    sample = train[3]
    assert set(sample) == {"tokens", "labels", "loss_mask"} and sample["tokens"].shape == (8,)
    assert int(sample["tokens"].max()) < 37


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(data_path=[]), "--data-path: give a dataset prefix"),
        (dict(data_path=["0.5", "a", "b"]), "--data-path 0.5 a b: expected weight prefix pairs"),
        (dict(data_path=["a", "0.5", "b", "0.5"]), "weights first"),
        (dict(data_path=["0", "a", "1", "b"]), "--data-path: blending weights must be positive"),
        (dict(data_path=["a"], split="90,x"), "--split 90,x"),
        (dict(data_path=["a"], split="1,2,3,4"), "--split 1,2,3,4"),
        (dict(data_path=["a"], split="0,0,0"), "--split 0,0,0"),
        (dict(data_path=[], mock_data=True), "--mock-data needs a positive vocabulary size"),
    ],
)
def test_config_mistakes_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_an_empty_validation_split_is_none_and_an_empty_train_split_is_refused(corpus_prefix, tmp_path):
    """Megatron skips evaluation when --split leaves the validation split without documents
    (its scripts' 99990,8,2 on a small corpus); the train split cannot be empty."""
    config = DataConfig([corpus_prefix], split="100,0,0", cache_dir=str(tmp_path))
    train, valid, test = build_train_valid_test_datasets(config, train_samples=4, valid_samples=4, test_samples=4,
                                                         seq_length=8, seed=0)
    assert len(train) == 4 and valid is None and test is None
    no_train = DataConfig([corpus_prefix], split="0,1,0", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--split 0,1,0: the train split of .*corpus .* is empty"):
        build_train_valid_test_datasets(no_train, train_samples=4, valid_samples=0, test_samples=0, seq_length=8,
                                        seed=0)
    with pytest.raises(ValueError, match="corpusx.idx: no such file"):
        build_train_valid_test_datasets(DataConfig([corpus_prefix + "x"]), train_samples=4, valid_samples=0,
                                        test_samples=0, seq_length=8, seed=0)
