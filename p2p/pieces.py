"""Dragonfly v2 piece layout: lengths, numbering, and ``crc32:`` piece digests."""

from __future__ import annotations

from dataclasses import dataclass

from isal import isal_zlib

MIN_PIECE_LENGTH = 4 << 20
MAX_PIECE_LENGTH = 64 << 20
PIECES_TARGET = 500


def piece_length(content_length: int, requested: int | None = None) -> int:
    """The requested length, else ``next_pow2(content_length / 500)`` clamped to 4 MiB..64 MiB."""
    if requested is not None:
        if not MIN_PIECE_LENGTH <= requested <= MAX_PIECE_LENGTH:
            raise ValueError(f"piece length {requested} outside 4 MiB..64 MiB")
        return requested
    wanted = max(content_length // PIECES_TARGET, 1)
    return min(max(1 << (wanted - 1).bit_length(), MIN_PIECE_LENGTH), MAX_PIECE_LENGTH)


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of a task: numbered from 0, ``offset = number * piece_length``, the last one short."""

    number: int
    offset: int
    length: int


def pieces(content_length: int, length: int) -> list[Piece]:
    """Every piece of a task of *content_length* bytes."""
    count = -(-content_length // length)
    return [Piece(n, n * length, min(length, content_length - n * length)) for n in range(count)]


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The CRC-32 (IEEE, zlib's) of *data* continuing from *value*; ISA-L's, five times zlib's speed."""
    return isal_zlib.crc32(data, value)


def piece_digest(data: bytes | bytearray | memoryview) -> str:
    """``crc32:<decimal u32>``, as Dragonfly stores and checks piece digests."""
    return f"crc32:{crc32(data)}"


def verify_piece(data: bytes, digest: str) -> bool:
    """Whether *data* matches a ``crc32:`` digest."""
    return piece_digest(data) == digest
