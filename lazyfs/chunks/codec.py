"""Chunk compression and decompression: zstd frames, raw LZ4 blocks, or stored data."""

from __future__ import annotations

import enum
import threading

import lz4.block
import zstandard

from lazyfs.errors import FormatError


class Compressor(enum.IntEnum):
    """Compression algorithm ids as stored in the RAFS v6 blob table."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3

    @classmethod
    def parse(cls, name: str) -> Compressor:
        """Look a compressor up by its nydus-image name (``zstd``, ``lz4_block``, ``none``)."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown compressor {name!r} (zstd, lz4_block, none)") from None

    @property
    def label(self) -> str:
        """The nydus-image name of this compressor."""
        return self.name.lower()


_ZSTD_LEVEL = 3
_local = threading.local()  # zstandard (de)compressor objects must not be shared between threads


def _zstd_compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    compressor: zstandard.ZstdCompressor = _local.compressor
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    decompressor: zstandard.ZstdDecompressor = _local.decompressor
    return decompressor


def compress(algo: Compressor, data: bytes) -> bytes:
    """Compress *data*; the caller stores it raw when the result is not smaller."""
    if algo is Compressor.ZSTD:
        return _zstd_compressor().compress(data)
    if algo is Compressor.LZ4_BLOCK:
        return bytes(lz4.block.compress(data, store_size=False))
    if algo is Compressor.NONE:
        return data
    raise FormatError(f"compressor {algo.label} is not supported for writing")


def decompress(algo: Compressor, data: bytes, size: int) -> bytes:
    """Decompress one chunk that must expand to exactly *size* bytes."""
    try:
        if algo is Compressor.ZSTD:
            out = _zstd_decompressor().decompress(data, max_output_size=size)
        elif algo is Compressor.LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif algo is Compressor.NONE:
            out = data
        else:
            raise FormatError(f"compressor {algo.label} is not supported")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise FormatError(f"corrupt {algo.label} chunk: {exc}") from exc
    if len(out) != size:
        raise FormatError(f"{algo.label} chunk expands to {len(out)} bytes, expected {size}")
    return bytes(out)
