"""The .bin/.idx format: exact round trip, dtype choice, Megatron's header, and validation that
refuses truncated, corrupt and foreign files with a message naming the file."""

import struct

import numpy as np
import pytest

from megamoe.data.indexed_dataset import MAGIC, IndexedDataset, IndexedDatasetWriter, best_dtype


def _write(prefix, docs, dtype):
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=dtype))
    return str(prefix)


def test_uint16_is_chosen_exactly_when_every_id_fits():
    assert best_dtype(320) == np.uint16
    assert best_dtype(2**16) == np.uint16  # ids 0..65535
    assert best_dtype(2**16 + 1) == np.int32
    assert best_dtype(256_000) == np.int32


@pytest.mark.parametrize("dtype,top", [(np.uint16, 2**16 - 1), (np.int32, 2**31 - 1)])
def test_documents_read_back_exactly(tmp_path, dtype, top):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, top, size=n, endpoint=True) for n in (5, 1, 0, 17, 3)]
    docs[0][0] = top
    ds = IndexedDataset(_write(tmp_path / "d", docs, dtype))
    assert ds.dtype == np.dtype(dtype) and len(ds) == 5 and ds.num_tokens == 26
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.get(3, offset=4, length=6), docs[3][4:10])
    assert (tmp_path / "d.bin").stat().st_size == 26 * np.dtype(dtype).itemsize


def test_the_index_is_megatrons_mmidx_version_1_layout(tmp_path):
    prefix = _write(tmp_path / "d", [[1, 2, 3], [4, 5]], np.uint16)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == MAGIC == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, n_seq, n_doc) == (1, 8, 2, 3)  # dtype code 8 = uint16
    body = raw[34:]
    assert np.frombuffer(body[:8], np.int32).tolist() == [3, 2]
    assert np.frombuffer(body[8:24], np.int64).tolist() == [0, 6]  # byte offsets
    assert np.frombuffer(body[24:], np.int64).tolist() == [0, 1, 2]


def test_an_empty_dataset_is_valid(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "e", [], np.uint16))
    assert len(ds) == 0 and ds.num_tokens == 0


def test_a_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document(np.arange(4, dtype=np.uint16))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, change):
    data = bytearray(open(path, "rb").read())
    data = change(data)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "target,change,message",
    [
        (".bin", lambda b: b[:-2], r"d\.bin: size 18 bytes, but .*d\.idx describes 20 bytes"),
        (".bin", lambda b: b + b"\x00\x00", r"d\.bin: size 22 bytes"),
        (".idx", lambda b: b[:-8], r"d\.idx: size .* does not match its header"),
        (".idx", lambda b: b[:20], r"d\.idx: truncated"),
        (".idx", lambda b: b"PK\x03\x04" + b[4:], r"d\.idx: not an indexed-dataset index \(bad magic"),
        (".idx", lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], r"d\.idx: unsupported version 2"),
        (".idx", lambda b: b[:17] + b"\x63" + b[18:], r"d\.idx: unknown dtype code 99"),
        (".idx", lambda b: b[:-8] + struct.pack("<q", 7), r"d\.idx: document indices do not span"),
    ],
)
def test_damaged_files_are_refused_with_the_file_and_the_problem(tmp_path, target, change, message):
    prefix = _write(tmp_path / "d", [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], np.uint16)
    _corrupt(prefix + target, change)
    with pytest.raises(ValueError, match=message):
        IndexedDataset(prefix)


def test_a_foreign_file_and_a_missing_file_are_refused(tmp_path):
    (tmp_path / "f.idx").write_text("just some text that happens to be long enough for a header\n")
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"f\.idx: not an indexed-dataset index"):
        IndexedDataset(str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"nothere\.idx: no such file"):
        IndexedDataset(str(tmp_path / "nothere"))


def test_datasets_pickle_by_prefix(tmp_path):
    import pickle

    ds = IndexedDataset(_write(tmp_path / "d", [[7, 8, 9]], np.int32))
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[0], [7, 8, 9])
