"""Proof that a conversion lost nothing: counts of the source tensors read, and a checksum of
the full (layout-free) tensors that a source and its converted target must share.

``Tally`` records every tensor a reader touched, per source file, as one of:

* ``used``: the canonical copy of a shard, or a ZeRO-1 range of an optimizer tensor;
* ``replica``: a copy on another rank, compared bitwise with the canonical one.

A reader lists every tensor its files hold (``expect``) before it streams; ``check_complete``
raises if any of them was never read, so a tensor the converter does not know cannot be dropped
silently.  ``FullChecksum`` hashes each full tensor's name, kind, dtype, shape and bytes and sums
the 64-bit digests (order-independent), so the same full state read from any layout gives the
same number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from megamoe.checkpointing.format import CheckpointError


@dataclass
class Tally:
    expected: dict[str, set] = field(default_factory=dict)  # file -> keys of the tensors it holds
    seen: dict[str, set] = field(default_factory=dict)
    used: int = 0
    replicas: int = 0

    def expect(self, path: str, keys) -> None:
        self.expected.setdefault(path, set()).update(keys)

    def _mark(self, path: str, key) -> None:
        assert key in self.expected.get(path, ()), f"{path}: {key} was not listed by the reader"
        self.seen.setdefault(path, set()).add(key)

    def use(self, path: str, key) -> None:
        self._mark(path, key)
        self.used += 1

    def replica(self, path: str, key) -> None:
        self._mark(path, key)
        self.replicas += 1

    @property
    def num_files(self) -> int:
        return len(self.expected)

    @property
    def num_tensors(self) -> int:
        return sum(len(keys) for keys in self.expected.values())

    def check_complete(self) -> None:
        """Raise ``CheckpointError`` naming the file if some tensor of the source was never read."""
        for path, keys in self.expected.items():
            missed = keys - self.seen.get(path, set())
            if missed:
                shown = sorted(map(str, missed))[:5]
                raise CheckpointError(
                    f"{path}: {len(missed)} tensors were not converted (e.g. {shown}); this converter does not "
                    "know them, and refuses to drop them"
                )


def tensor_digest(name: str, tensor: torch.Tensor) -> int:
    """64-bit digest of a tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(memoryview(flat.view(torch.uint8).numpy()))
    return int.from_bytes(h.digest(), "little")


@dataclass
class FullChecksum:
    """Count, element total and order-independent checksum of a set of named full tensors."""

    count: int = 0
    numel: int = 0
    digest: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.count += 1
        self.numel += tensor.numel()
        self.digest = (self.digest + tensor_digest(name, tensor)) % (1 << 64)

    def __str__(self) -> str:
        return f"{self.count} tensors, {self.numel:,} elements, checksum {self.digest:016x}"
