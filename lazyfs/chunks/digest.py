"""Chunk digests: blake3 (nydus-image's default) or sha256, always over uncompressed data."""

from __future__ import annotations

import enum
import hashlib

import blake3

from lazyfs.errors import DigestMismatch


class Digester(enum.IntEnum):
    """Digest algorithm ids as stored in the RAFS v6 blob table."""

    BLAKE3 = 0
    SHA256 = 1

    @classmethod
    def parse(cls, name: str) -> Digester:
        """Look a digester up by name (``blake3`` or ``sha256``)."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown digester {name!r} (blake3, sha256)") from None

    @property
    def label(self) -> str:
        """The nydus-image name of this digester."""
        return self.name.lower()


def digest(algo: Digester, data: bytes) -> bytes:
    """The 32-byte digest of *data*."""
    if algo is Digester.BLAKE3:
        return blake3.blake3(data, max_threads=1).digest()
    return hashlib.sha256(data).digest()


def verify(algo: Digester, data: bytes, expected: bytes, what: str) -> None:
    """Raise :class:`DigestMismatch` naming *what* unless *data* hashes to *expected*."""
    got = digest(algo, data)
    if got != expected:
        raise DigestMismatch(f"{what}: {algo.label} digest {got.hex()} != expected {expected.hex()}")
