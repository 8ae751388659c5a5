"""GPT samples: text -> .bin/.idx -> samples reproduces the token stream exactly; sample i is a
pure function of (seed, data, split, seq_length, i); index caches are reused, rebuilt when the
data or parameters change, and safe to build from several processes at once."""

import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from megamoe.data import gpt_dataset
from megamoe.data.gpt_dataset import GPTDataset, MockGPTDataset
from megamoe.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megamoe.data.tokenizer import load_tokenizer

SEQ = 16


def _dataset(prefix, cache_dir, *, num_samples, seed=3, documents=None, seq_length=SEQ):
    indexed = IndexedDataset(prefix)
    return GPTDataset(indexed, documents=documents or (0, len(indexed)), num_samples=num_samples,
                      seq_length=seq_length, seed=seed, cache_dir=str(cache_dir), name="t")


def test_samples_cut_the_shuffled_token_stream_of_the_text_exactly(corpus, tokenizer_model, corpus_prefix, tmp_path):
    _, docs = corpus
    tok = load_tokenizer(tokenizer_model)
    encoded = [tok.encode(d) + [tok.eod_id] for d in docs if tok.encode(d)]  # straight from the text
    first, last = 20, 300
    ds = _dataset(corpus_prefix, tmp_path, num_samples=0, documents=(first, last))
    spe = ds.samples_per_epoch
    ds = _dataset(corpus_prefix, tmp_path, num_samples=2 * spe + spe // 2, documents=(first, last))
    assert spe == (sum(len(e) for e in encoded[first:last]) - 1) // SEQ
    seen_orders = []
    for epoch in range(3):
        order, ends, cuts = ds.epoch_plan(epoch)
        assert sorted(order.tolist()) == list(range(first, last)) and sorted(cuts.tolist()) == list(range(spe))
        stream = np.concatenate([encoded[d] for d in order])
        np.testing.assert_array_equal(ends, np.cumsum([len(encoded[d]) for d in order]))
        for k in range(spe if epoch < 2 else spe // 2):
            sample = ds[epoch * spe + k]
            c = int(cuts[k])
            window = stream[c * SEQ : c * SEQ + SEQ + 1]
            assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
            assert sample["tokens"].tolist() == window[:-1].tolist()
            assert sample["labels"].tolist() == window[1:].tolist()
            assert sample["loss_mask"].tolist() == [1.0] * SEQ
        seen_orders.append(order.tolist())
    assert seen_orders[0] != seen_orders[1] and seen_orders[0] != sorted(seen_orders[0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sample_i_does_not_depend_on_how_many_samples_are_built(corpus_prefix, tmp_path):
    small = _dataset(corpus_prefix, tmp_path / "a", num_samples=40)
    large = _dataset(corpus_prefix, tmp_path / "b", num_samples=5 * small.samples_per_epoch)
    assert len(small) == 40
    for i in range(40):
        assert torch.equal(small[i]["tokens"], large[i]["tokens"])
    other_seed = _dataset(corpus_prefix, tmp_path / "a", num_samples=40, seed=4)
    assert not all(torch.equal(small[i]["tokens"], other_seed[i]["tokens"]) for i in range(40))


def test_the_index_cache_is_reused_and_rebuilt_when_data_or_parameters_change(tmp_path, monkeypatch):
    prefix = str(tmp_path / "d")

    def write(docs):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(np.asarray(d, dtype=np.uint16))

    write([list(range(1, 40)), list(range(40, 90))])
    cache = tmp_path / "cache"
    before = [_dataset(prefix, cache, num_samples=5, seq_length=8)[i]["tokens"] for i in range(5)]
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].startswith("t-epoch0-")

    def no_rebuild(*args):
        raise AssertionError("the cached index should have been reused")

    with monkeypatch.context() as m:
        m.setattr(GPTDataset, "_build_epoch", no_rebuild)
        again = [_dataset(prefix, cache, num_samples=5, seq_length=8)[i]["tokens"] for i in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(before, again))

    _dataset(prefix, cache, num_samples=5, seq_length=9)
    _dataset(prefix, cache, num_samples=5, seq_length=8, seed=11)
    assert len(os.listdir(cache)) == 3  # a new parameter set is a new file, not an overwrite

    write([list(range(1, 70)), list(range(70, 90))])  # same prefix, different documents
    changed = _dataset(prefix, cache, num_samples=5, seq_length=8)
    order, ends, _ = changed.epoch_plan(0)
    assert ends[-1] == 89 and sorted(np.diff(np.concatenate([[0], ends])).tolist()) == [20, 69]

    damaged = os.path.join(cache, files[0])
    with open(damaged, "r+b") as f:
        f.truncate(100)
    write([list(range(1, 40)), list(range(40, 90))])
    rebuilt = [_dataset(prefix, cache, num_samples=5, seq_length=8)[i]["tokens"] for i in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(before, rebuilt))


def test_concurrent_builders_of_the_same_cache_agree_and_leave_no_temporaries(corpus_prefix, tmp_path, monkeypatch):
    # Every builder sleeps inside the build so that all of them write the same files at once
    # (the code path of several ranks starting together; processes differ only in pids).
    build = GPTDataset._build_epoch

    def slow_build(self, *args):
        time.sleep(0.2)
        return build(self, *args)

    monkeypatch.setattr(GPTDataset, "_build_epoch", slow_build)
    cache = str(tmp_path / "shared")
    n = 3 * 400

    def read_all(_):
        ds = _dataset(corpus_prefix, cache, num_samples=n)
        return [ds[i]["tokens"].tolist() for i in range(0, n, 7)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_all, range(4)))
    alone = _dataset(corpus_prefix, str(tmp_path / "alone"), num_samples=n)
    assert results[0] == results[1] == results[2] == results[3] == [alone[i]["tokens"].tolist() for i in range(0, n, 7)]
    assert all(f.endswith(".npy") and not f.startswith(".") for f in os.listdir(cache))


def test_a_split_too_small_for_one_sample_is_refused(corpus_prefix, tmp_path):
    with pytest.raises(ValueError, match=r"corpus: the t split \(documents 0\.\.1\) holds \d+ tokens.*--seq-length 4096"):
        _dataset(corpus_prefix, tmp_path, num_samples=1, documents=(0, 1), seq_length=4096)


def test_documents_of_several_sequences_are_refused(tmp_path):
    prefix = tmp_path / "multi"
    with open(f"{prefix}.idx", "wb") as f:  # Megatron's layout: 2 sequences (sentences) forming 1 document
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 2))
        f.write(struct.pack("<2i2q2q", 10, 10, 0, 20, 0, 2))
    (tmp_path / "multi.bin").write_bytes(bytes(40))
    with pytest.raises(ValueError, match="multi.idx: documents of several sequences"):
        _dataset(str(prefix), tmp_path, num_samples=1, seq_length=4)


def test_mock_samples_are_a_pure_function_of_seed_stream_and_index():
    a = MockGPTDataset(num_samples=10, seq_length=SEQ, vocab_size=50, seed=1, stream=0)
    b = MockGPTDataset(num_samples=1000, seq_length=SEQ, vocab_size=50, seed=1, stream=0)
    valid = MockGPTDataset(num_samples=10, seq_length=SEQ, vocab_size=50, seed=1, stream=1)
    for i in range(10):
        x = a[i]
        assert x["tokens"].shape == (SEQ,) and 0 <= int(x["tokens"].min()) and int(x["tokens"].max()) < 50
        assert torch.equal(x["labels"][:-1], x["tokens"][1:])
        assert torch.equal(x["tokens"], b[i]["tokens"])
    assert not torch.equal(a[0]["tokens"], valid[0]["tokens"])


def test_seeded_permutations_are_fixed_numbers():
    # Pinned values: a numpy upgrade must not silently reshuffle a run being resumed.
    assert gpt_dataset.seeded_permutation(8, 1234, 0, 0).tolist() == [5, 6, 3, 7, 4, 1, 2, 0]
