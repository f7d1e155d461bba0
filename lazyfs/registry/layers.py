"""Layer blobs as uncompressed tar streams: gzip, zstd or plain tar, by media type."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO, cast

import zstandard

from lazyfs.errors import FormatError

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


LayerStream = IO[bytes]
"""A readable binary stream of tar data; read it sequentially, e.g. ``tarfile.open(fileobj=s, mode="r|")``."""


def layer_compression(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``none`` for a layer media type; FormatError if it is not a tar layer."""
    base = media_type.split(";")[0].strip()
    if base.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if base.endswith("+zstd"):
        return "zstd"
    if base.endswith(("tar", ".tar")):
        return "none"
    raise FormatError(f"unsupported layer media type {media_type[:100]!r}")


def open_layer_tar(path: Path, media_type: str) -> LayerStream:
    """Open a layer blob as a streaming, decompressing reader of its tar (for ``tarfile`` mode ``r|``)."""
    compression = layer_compression(media_type)
    with path.open("rb") as probe:
        magic = probe.read(len(_ZSTD_MAGIC))
    if compression == "gzip":
        _expect_magic(magic, _GZIP_MAGIC, path, compression)
        return cast(IO[bytes], gzip.open(path, "rb"))
    if compression == "zstd":
        _expect_magic(magic, _ZSTD_MAGIC, path, compression)
        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)
    return path.open("rb")


def _expect_magic(magic: bytes, expected: bytes, path: Path, compression: str) -> None:
    """Raise FormatError if a layer does not start like its media type promises."""
    if not magic.startswith(expected):
        raise FormatError(f"layer {path} is not {compression}-compressed despite its media type")
