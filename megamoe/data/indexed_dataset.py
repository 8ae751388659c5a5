"""Memory-mapped indexed datasets: a ``.bin`` of token ids and an ``.idx`` describing them.

The layout is Megatron-LM's ``MMIDIDX`` version 1, so files written by Megatron's
preprocess_data.py read here unchanged and the other way round.  All integers little-endian:

    .idx  magic            9 bytes  b"MMIDIDX\\x00\\x00"
          version          uint64   1
          dtype code       uint8    see DTYPE_CODES (uint16 when the vocabulary fits, else int32)
          sequence count   uint64   N
          document count   uint64   D + 1 (document_indices has a leading 0)
          sequence_lengths int32[N] tokens per sequence
          sequence_pointers int64[N] byte offset of each sequence in .bin
          document_indices int64[D+1] sequence index where each document starts, then N
    .bin  the token ids of all sequences back to back, in the dtype above

megamoe's preprocessing writes one sequence per document (EOD included).  Opening a dataset
checks the magic, version, dtype code, that the ``.idx`` size matches its counts and that the
``.bin`` size matches the index; every refusal is a ValueError naming the file and the problem.
"""

from __future__ import annotations

import os
import struct
from array import array

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")


def best_dtype(vocab_size: int) -> type:
    """The smallest token dtype holding ids ``0 .. vocab_size-1``: uint16 up to 65536, else int32."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


def _code_of(dtype) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise AssertionError(f"no dtype code for {dtype}")


class IndexedDatasetWriter:
    """Streams documents to ``{prefix}.bin`` and writes ``{prefix}.idx`` on ``finish()``.

    Both files are written under temporary names and renamed into place (``.bin`` first, then
    ``.idx``), so a reader never sees a half-written dataset and an interrupted run leaves no
    file that looks complete.  Use as a context manager: leaving it by an exception discards the
    temporaries.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _code_of(self.dtype)
        directory = os.path.dirname(prefix)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._tmp_bin = f"{prefix}.bin.tmp{os.getpid()}"
        self._tmp_idx = f"{prefix}.idx.tmp{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("i")  # compact: 4 bytes per document even for billions of them
        self.num_tokens = 0

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document (one sequence) of token ids, already in ``self.dtype``."""
        assert ids.dtype == self.dtype, (ids.dtype, self.dtype)
        self._bin.write(ids.tobytes())
        self._lengths.append(len(ids))
        self.num_tokens += len(ids)

    def add_documents(self, data: bytes, lengths) -> None:
        """Append several documents given as their concatenated bytes and their lengths."""
        assert len(data) == sum(lengths) * self.dtype.itemsize
        self._bin.write(data)
        self._lengths.extend(lengths)
        self.num_tokens += sum(lengths)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finish(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(documents)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(documents.tobytes())
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        os.replace(self._tmp_idx, f"{self.prefix}.idx")

    def discard(self) -> None:
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.discard()


class IndexedDataset:
    """Read-only view of ``{prefix}.idx`` / ``{prefix}.bin`` through memory maps.

    ``ds[i]`` is sequence ``i`` as a numpy array of ``ds.dtype``; ``ds.get(i, offset, length)``
    reads part of it without touching the rest.  The object pickles by prefix (workers reopen
    the maps), so it can be handed to other processes.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"indexed dataset {path}: no such file (--data-path takes the prefix without .bin/.idx)")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise ValueError(f"indexed dataset {idx_path}: truncated ({idx_size} bytes, shorter than the header)")
        with open(idx_path, "rb") as f:
            magic, version, code, num_seq, num_doc_idx = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"indexed dataset {idx_path}: not an indexed-dataset index (bad magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"indexed dataset {idx_path}: unsupported version {version} (this reader reads {VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(f"indexed dataset {idx_path}: unknown dtype code {code}")
        expected = _HEADER.size + num_seq * (4 + 8) + num_doc_idx * 8
        if idx_size != expected:
            raise ValueError(
                f"indexed dataset {idx_path}: size {idx_size} bytes does not match its header "
                f"({num_seq} sequences, {num_doc_idx} document indices -> {expected} bytes); truncated or corrupt"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, num_seq, offset)
        offset += num_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, num_seq, offset)
        offset += num_seq * 8
        self.document_indices = np.frombuffer(self._idx, np.int64, num_doc_idx, offset)
        self._check_consistency(idx_path, bin_path)
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if os.path.getsize(bin_path) else np.zeros(0, np.uint8)

    def _check_consistency(self, idx_path: str, bin_path: str) -> None:
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(self.sequence_lengths):
            raise ValueError(f"indexed dataset {idx_path}: document indices do not span the sequences; corrupt")
        expected = 0
        if len(self.sequence_lengths):
            expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        actual = os.path.getsize(bin_path)
        if actual != expected:
            raise ValueError(
                f"indexed dataset {bin_path}: size {actual} bytes, but {idx_path} describes {expected} bytes; "
                "truncated, or the .bin and .idx come from different runs"
            )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def sample_max_token(self, max_tokens: int = 1 << 24) -> int:
        """Largest id among the first ``max_tokens`` tokens (-1 when empty): a cheap check that the
        data was made with the tokenizer a run is given, without reading a huge .bin whole."""
        n = min(self.num_tokens, max_tokens)
        return int(np.frombuffer(self._bin, self.dtype, n, 0).max()) if n else -1

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``index`` (to its end when ``length`` is None)."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        assert 0 <= offset and offset + length <= size, (index, offset, length, size)
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

