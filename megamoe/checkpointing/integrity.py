"""What a checkpoint's bytes must be: the checksums save records and load verifies, and the
finite-state rule.

* Each chunk: the CRC-32 of its tensor's bytes (``tensor_crc32``), beside the chunk in
  ``metadata.json``, so that a damaged file is refused naming the tensor.
* Each file: the CRC-32 of all its bytes, computed as ``torch.save`` writes them
  (``Crc32Writer``) and verified by reading the file once (``file_crc32``); it also covers what
  no chunk does (the RNG states, the file's own structure).
* ``metadata.json``: the CRC-32 of its canonical JSON, stored inside it under ``METADATA_CRC``
  (``metadata_crc32``).

CRC-32 (zlib) finds accidental damage (a bad disk, a bad copy, bytes overwritten); it does not
defend against deliberate tampering.  Checkpoints written before these checksums have none, and
load unverified.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import torch

METADATA_CRC = "metadata_crc32"
_BLOCK = 16 << 20  # bytes read at a time when verifying a file


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a contiguous CPU tensor's bytes (any dtype)."""
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


def file_crc32(path: str) -> int:
    """CRC-32 of every byte of the file at ``path``."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


class Crc32Writer:
    """A binary file for ``torch.save`` that keeps the CRC-32 of what was written through it, and
    the ``OSError`` a write raised (torch reports it only as "unexpected pos ...")."""

    def __init__(self, raw) -> None:
        self.raw, self.crc32 = raw, 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        try:
            return self.raw.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.raw.flush()


def metadata_crc32(metadata: dict) -> int:
    """CRC-32 of ``metadata``'s canonical JSON (sorted keys, no spaces), ``METADATA_CRC`` left out."""
    rest = {key: value for key, value in metadata.items() if key != METADATA_CRC}
    return zlib.crc32(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (statvfs)."""
    return shutil.disk_usage(path).free


def check_free_space(path: str, needed: int, what: str) -> str | None:
    """None when ``path``'s file system has ``needed`` bytes free, else one line saying that
    ``what`` needs them and how many are free."""
    free = free_bytes(path)
    if free >= needed:
        return None
    return f"{what} needs {needed:,} bytes but the file system of {os.path.abspath(path)} has {free:,} free"
