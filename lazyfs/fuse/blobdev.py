"""``--mode erofs``: a read-only pyfuse3 filesystem with one ``<blob_id>.blob.data`` file per blob.

The kernel EROFS driver reads the bootstrap itself and uses these files (through loop devices) as its
data devices. Each file holds its blob's chunks uncompressed at their ``uncompressed_offset`` and zeros
between them (nydusd's cache layout); a read fetches, through the :class:`ChunkSource`, only the chunks
it overlaps. Inode 1 is the directory, blob *i* is inode ``i + 2``.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3

from lazyfs.errors import LazyfsError
from lazyfs.fuse.filesystem import TIMEOUT, ChunkSource
from lazyfs.fuse.stats import ReadStats
from lazyfs.rafs import layout as L
from lazyfs.rafs.tree import BLOCK_SIZE, BlobInfo, ChunkRef

log = logging.getLogger(__name__)
FIRST_BLOB_INODE = pyfuse3.ROOT_INODE + 1


def device_name(blob: BlobInfo) -> str:
    """The file name of *blob*'s device."""
    return f"{blob.blob_id}.blob.data"


@dataclass(frozen=True)
class BlobDevice:
    """One blob as a flat device: its chunks sorted by uncompressed offset, for range lookups."""

    blob: BlobInfo
    chunks: list[ChunkRef]
    starts: list[int]  # uncompressed_offset of each chunk

    @classmethod
    def build(cls, blob: BlobInfo, refs: Sequence[ChunkRef]) -> BlobDevice:
        """Index *refs* (the blob's chunks, any order, duplicates allowed) by uncompressed offset."""
        chunks = sorted({ref.index: ref for ref in refs}.values(), key=lambda r: r.uncompressed_offset)
        return cls(blob, chunks, [ref.uncompressed_offset for ref in chunks])

    @property
    def size(self) -> int:
        """The device size: the blob's uncompressed size rounded up to whole blocks."""
        return L.align(self.blob.uncompressed_size, BLOCK_SIZE)

    def overlapping(self, start: int, end: int) -> list[ChunkRef]:
        """The chunks holding any byte of ``[start, end)``, by offset."""
        first = max(bisect.bisect_right(self.starts, start) - 1, 0)
        last = bisect.bisect_left(self.starts, end, lo=first)
        return [ref for ref in self.chunks[first:last] if ref.uncompressed_offset + ref.uncompressed_size > start]


def spans(start: int, end: int, refs: Sequence[ChunkRef]) -> list[tuple[ChunkRef, int, int]]:
    """The part of each chunk that device bytes ``[start, end)`` cover, as ``(ref, from, to)``."""
    return [
        (ref, max(start - ref.uncompressed_offset, 0), min(end - ref.uncompressed_offset, ref.uncompressed_size))
        for ref in refs
    ]


def assemble(start: int, end: int, parts: Sequence[tuple[ChunkRef, int, int]], data: Sequence[bytes]) -> bytes:
    """Bytes ``[start, end)`` of a device from the chunk pieces overlapping it; zeros where none lies."""
    if len(parts) == 1 and parts[0][0].uncompressed_offset + parts[0][1] == start and len(data[0]) == end - start:
        return data[0]
    out = bytearray(end - start)
    for (ref, lo, _), piece in zip(parts, data, strict=True):
        at = ref.uncompressed_offset + lo - start
        out[at : at + len(piece)] = piece
    return bytes(out)


class BlobDevicesFilesystem(pyfuse3.Operations):
    """pyfuse3 operations serving one flat directory of blob devices."""

    supports_dot_lookup = False

    def __init__(self, devices: Sequence[BlobDevice], source: ChunkSource, stats: ReadStats | None = None) -> None:
        super().__init__()
        self.devices = list(devices)
        self.source = source
        self.stats = stats or ReadStats()
        self._by_name = {os.fsencode(device_name(d.blob)): FIRST_BLOB_INODE + i for i, d in enumerate(devices)}

    def _device(self, inode: int) -> BlobDevice:
        index = inode - FIRST_BLOB_INODE
        if not 0 <= index < len(self.devices):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.devices[index]

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            attr.st_nlink = 2
        else:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            attr.st_nlink = 1
            attr.st_size = self._device(inode).size
            attr.st_blocks = -(-attr.st_size // 512)
        attr.st_blksize = BLOCK_SIZE
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        return attr

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.stats.lookups += 1
        inode = self._by_name.get(bytes(name)) if parent_inode == pyfuse3.ROOT_INODE else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self._by_name.items())
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), self._attrs(inode), index + 1):
                break

    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._device(inode)
        self.stats.opens += 1
        # direct_io: the EROFS page cache above holds the data; caching it here too would double it
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        device = self._device(fh)
        end = min(off + size, device.size)
        if off >= end:
            return b""
        parts = spans(off, end, device.overlapping(off, end))
        try:
            data = await self.source.read_ranges(device.blob, parts) if parts else []
        except LazyfsError as exc:
            self.stats.read_errors += 1
            log.error("event=read_failed blob=%s offset=%d size=%d error=%s", device.blob.blob_id, off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.stats.reads += 1
        self.stats.read_bytes += end - off
        return assemble(off, end, parts, data)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = sum(d.size for d in self.devices) // BLOCK_SIZE
        data.f_files = len(self.devices) + 1
        data.f_namemax = 255
        return data
