"""Where compressed blob bytes come from: a :class:`Backend` reads one byte range of one blob.

Backends do no caching, merging or retrying (the fetcher does); they return exactly the bytes asked
for or raise :class:`BackendError`. ``dir`` reads local blob files, ``registry`` sends Range GETs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import trio

from lazyfs.chunks.cache import check_blob_id
from lazyfs.errors import FormatError, LazyfsError
from lazyfs.rafs.tree import BlobInfo
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.errors import RegistryError


class BackendError(LazyfsError):
    """A backend could not deliver a byte range: unreachable, missing blob, short or oversized answer."""


class Backend(Protocol):
    """A source of compressed blob data."""

    async def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        """Exactly *length* bytes of the blob file from *offset*, or BackendError."""
        ...


def _what(blob: BlobInfo, offset: int, length: int) -> str:
    return f"blob {blob.blob_id} bytes {offset}+{length}"


class DirBackend:
    """Blob files named by blob id in a local directory."""

    def __init__(self, blob_dir: str | os.PathLike[str]) -> None:
        self.blob_dir = Path(blob_dir)

    async def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        """Read the range in a worker thread."""
        return await trio.to_thread.run_sync(self._read, blob, offset, length)

    def _read(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        what = _what(blob, offset, length)
        try:
            path = self.blob_dir / check_blob_id(blob.blob_id)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FormatError as exc:
            raise BackendError(f"{what}: {exc}") from exc
        except OSError as exc:
            raise BackendError(f"{what}: cannot open {path}: {exc.strerror or exc}") from exc
        try:
            parts, got = [], 0
            while got < length:
                part = os.pread(fd, length - got, offset + got)
                if not part:
                    raise BackendError(f"{what}: {path} ends after {offset + got} bytes")
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise BackendError(f"{what}: reading {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        return b"".join(parts)


class RegistryBackend:
    """Range GETs of blob ``sha256:<blob_id>`` in *repo*, through a :class:`RegistryClient`.

    The client brings authentication, redirects and its own retries of transient errors.
    """

    def __init__(self, client: RegistryClient, repo: str) -> None:
        self.client = client
        self.repo = repo

    async def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        """Stream the range, refusing a body longer or shorter than asked."""
        what = _what(blob, offset, length)
        body = bytearray()
        try:
            stream_cm = self.client.get_blob_stream(self.repo, f"sha256:{blob.blob_id}", offset=offset, length=length)
            async with stream_cm as stream:
                async for piece in stream:
                    if len(body) + len(piece) > length:
                        raise BackendError(f"{what} in {self.repo}: registry sent more than asked")
                    body += piece
        except RegistryError as exc:
            raise BackendError(f"{what} in {self.repo}: {exc}") from exc
        if len(body) != length:
            raise BackendError(f"{what} in {self.repo}: registry sent only {len(body)} bytes")
        return bytes(body)
