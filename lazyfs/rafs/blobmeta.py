"""Blob meta: the chunk-info ("ci") array of a data blob, in its v1 (16 B) and v2 (24 B) encodings.

The array is stored in the blob as ``ci data || 4096-byte header`` and in caches as
``ci data || pad to 4 KiB || header`` (../shared/docs/nydus-format.md §1.12).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lazyfs.errors import FormatError

META_MAGIC = 0xB10BB10B
HEADER_SIZE = 4096
CI_V1_SIZE = 16
CI_V2_SIZE = 24
MAX_CHUNKS = 1 << 24

CI_V2_COMPRESSED = 0x1
CI_V2_ZRAN = 0x2
CI_V2_BATCH = 0x4
CI_V2_ENCRYPTED = 0x8

_HEADER = struct.Struct("<IIIIQQQQQI4032sI")


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """One decoded chunk-info entry."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    flags: int = 0  # ci v2 flags byte
    data: int = 0  # ci v2 zran/batch/crc32 word


@dataclass(frozen=True, slots=True)
class MetaHeader:
    """The 4096-byte BlobCompressionContextHeader."""

    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    ctx_offset: int = 0
    ctx_size: int = 0
    ctx_count: int = 0

    def pack(self) -> bytes:
        """Serialise to 4096 bytes."""
        return _HEADER.pack(
            META_MAGIC, self.features, self.ci_compressor, self.ci_entries, self.ci_offset,
            self.ci_compressed_size, self.ci_uncompressed_size, self.ctx_offset, self.ctx_size,
            self.ctx_count, b"", META_MAGIC,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MetaHeader:
        """Parse and check magics."""
        if len(data) < HEADER_SIZE:
            raise FormatError(f"blob meta header truncated: {len(data)} of {HEADER_SIZE} bytes")
        f = _HEADER.unpack_from(data, 0)
        if f[0] != META_MAGIC or f[11] != META_MAGIC:
            raise FormatError(f"bad blob meta header magic {f[0]:#x}/{f[11]:#x}")
        return cls(*f[1:10])


def encode_v1(chunk: ChunkMeta) -> bytes:
    """Encode one ci v1 entry; sizes are 1..16 MiB, offsets bounded by the field widths."""
    usz, csz = chunk.uncompressed_size - 1, chunk.compressed_size - 1
    if not (0 <= usz < 1 << 24 and 0 <= csz < 1 << 24):
        raise FormatError(f"chunk size out of range for ci v1: {chunk}")
    if chunk.uncompressed_offset & 0xFFF or chunk.uncompressed_offset >= 1 << 44:
        raise FormatError(f"uncompressed offset not encodable: {chunk.uncompressed_offset}")
    if chunk.compressed_offset >= 1 << 40:
        raise FormatError(f"compressed offset not encodable: {chunk.compressed_offset}")
    uncomp = chunk.uncompressed_offset | ((usz & 0xFFFFF) << 44) | ((usz >> 20) << 8)
    comp = chunk.compressed_offset | ((csz & 0xFFFFF) << 44) | ((csz >> 20) << 40)
    return struct.pack("<QQ", uncomp, comp)


def _decode_v1(uncomp: int, comp: int) -> ChunkMeta:
    usize = ((uncomp >> 44) | ((uncomp & 0xF00) << 12)) + 1
    csize = ((comp >> 44) | ((comp & 0xF00_0000_0000) >> 20)) + 1
    return ChunkMeta(
        compressed_offset=comp & 0xFF_FFFF_FFFF,
        compressed_size=csize,
        uncompressed_offset=uncomp & 0xFFF_FFFF_F000,
        uncompressed_size=usize,
        compressed=csize != usize,
    )


def _decode_v2(uncomp: int, comp: int, data: int) -> ChunkMeta:
    flags = uncomp >> 56
    return ChunkMeta(
        compressed_offset=comp & 0xFF_FFFF_FFFF,
        compressed_size=comp >> 40,
        uncompressed_offset=(uncomp & 0xFFFF_FFFF) << 12,
        uncompressed_size=((uncomp >> 32) & 0xFF_FFFF) + 1,
        compressed=bool(flags & CI_V2_COMPRESSED),
        flags=flags,
        data=data,
    )


def decode(ci: bytes, count: int, v2: bool) -> list[ChunkMeta]:
    """Decode *count* entries from an uncompressed ci array."""
    if count > MAX_CHUNKS:
        raise FormatError(f"blob meta claims {count} chunks, more than the format allows")
    width = CI_V2_SIZE if v2 else CI_V1_SIZE
    if len(ci) < count * width:
        raise FormatError(f"blob meta truncated: {len(ci)} bytes for {count} entries of {width}")
    if v2:
        return [_decode_v2(*struct.unpack_from("<QQQ", ci, i * width)) for i in range(count)]
    return [_decode_v1(*struct.unpack_from("<QQ", ci, i * width)) for i in range(count)]
