"""On-disk cache of the index arrays of sample datasets, safe for many processes at once.

An array is stored as ``{cache_dir}/{name}-{key}.npy`` where ``key`` hashes everything the
array depends on, so changed data or parameters select a different file (a rebuild) instead of
silently reusing a stale one.  Files are written to a unique temporary name and renamed into
place: concurrent builders (several ranks, several nodes on shared storage) each produce the
same bytes and the last rename wins, and a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

import numpy as np

# Bumped whenever the way an array is computed changes, so old caches are not reused.
CACHE_FORMAT = 1
# Smaller arrays are read into memory: a memory map holds a file descriptor open, and a small
# dataset trained for thousands of epochs would otherwise hold thousands of them.
MMAP_MIN_BYTES = 16 * 2**20


def _open(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r" if os.path.getsize(path) >= MMAP_MIN_BYTES else None)


def cache_key(*parts) -> str:
    """A short hex digest of ``parts`` (bytes, numpy arrays, or anything with a stable repr)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(CACHE_FORMAT).encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(repr((part.dtype.str, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(repr(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def load_or_build(cache_dir: str, name: str, key: str, expected_shape: tuple, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cached array ``name-key`` (memory-mapped when large), built and stored if absent.

    A cached file whose shape is not ``expected_shape`` (e.g. a damaged copy) is rebuilt.
    Raises ValueError naming ``--data-cache-path`` if ``cache_dir`` cannot be written.
    """
    path = os.path.join(cache_dir, f"{name}-{key}.npy")
    if os.path.isfile(path):
        try:
            array = _open(path)
            if array.shape == expected_shape:
                return array
        except Exception:  # noqa: BLE001 - any unreadable cache file (numpy raises several kinds) is rebuilt
            pass
    array = build()
    assert array.shape == expected_shape, (array.shape, expected_shape)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}-", suffix=".npy.tmp")
    except OSError as err:
        raise ValueError(f"cannot write the index cache in {cache_dir} ({err.strerror}); set --data-cache-path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return _open(path)
