"""``--mode fuse``: a read-only pyfuse3 filesystem serving a whole RAFS v6 tree.

Metadata comes from the bootstrap (:class:`~lazyfs.rafs.reader.Bootstrap`), file data chunk by chunk
from a :class:`ChunkSource` that fetches, verifies and caches on first read. Inode numbers are nids,
except that the root (whose nid is not 1) and nid 1 trade places, as FUSE wants the root at 1.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pyfuse3
import trio

from lazyfs.errors import LazyfsError
from lazyfs.fuse.stats import ReadStats
from lazyfs.rafs.reader import Bootstrap, InodeInfo
from lazyfs.rafs.tree import BLOCK_SIZE, BlobInfo, ChunkRef

log = logging.getLogger(__name__)
TIMEOUT = 86400.0  # images are immutable: the kernel may cache entries and attributes for long


class ChunkSource(Protocol):
    """Where verified, uncompressed chunk data comes from (the fetcher and its cache)."""

    async def get_chunks(self, blob: BlobInfo, refs: Sequence[ChunkRef]) -> list[bytes]:
        """The whole data of *refs*, all in *blob*, in order; raises LazyfsError when it cannot."""
        ...

    async def read_ranges(self, blob: BlobInfo, spans: Sequence[tuple[ChunkRef, int, int]]) -> list[bytes]:
        """Bytes ``[start, stop)`` of each chunk in *spans*, all in *blob*; raises LazyfsError when it cannot."""
        ...

    async def read_ahead(self, blob: BlobInfo, refs: Sequence[ChunkRef]) -> None:
        """Get *refs* ready for a sequential reader (fetch them, or warm the page cache)."""
        ...


@dataclass
class _OpenFile:
    info: InodeInfo
    chunks: list[ChunkRef]
    next_offset: int = 0  # where a sequential reader continues
    readahead_end: int = 0  # chunk index below which readahead was already started


class RafsFilesystem(pyfuse3.Operations):
    """pyfuse3 operations over one bootstrap."""

    supports_dot_lookup = False

    def __init__(self, boot: Bootstrap, source: ChunkSource, stats: ReadStats | None = None,
                 readahead: tuple[trio.Nursery, int] | None = None) -> None:
        """*readahead* = (nursery, chunks): fetch that many chunks ahead of sequential readers."""
        super().__init__()
        self.boot = boot
        self.source = source
        self.stats = stats or ReadStats()
        self.readahead = readahead
        self.initialized = trio.Event()  # set once the kernel's FUSE INIT is handled
        self.opened: dict[int, None] = {}  # nids of the files opened so far, in first-open order

    def init(self) -> None:
        """FUSE INIT arrived: settings the kernel derives from it (e.g. readahead) are final after this."""
        self.initialized.set()
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1

    # -- inode numbers ----------------------------------------------------------------------------

    def _nid(self, ino: int) -> int:
        root = self.boot.root_nid
        return root if ino == pyfuse3.ROOT_INODE else (pyfuse3.ROOT_INODE if ino == root else ino)

    def _ino(self, nid: int) -> int:
        return self._nid(nid)  # the swap is its own inverse

    def _inode(self, ino: int) -> InodeInfo:
        try:
            return self.boot.inode(self._nid(ino))
        except LazyfsError as exc:
            log.error("event=bad_inode ino=%d error=%s", ino, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _attrs(self, info: InodeInfo) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._ino(info.nid)
        attr.st_mode = info.mode
        attr.st_nlink = info.nlink
        attr.st_uid, attr.st_gid = info.uid, info.gid
        attr.st_rdev = info.rdev
        attr.st_size = info.size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = -(-info.size // 512) if not info.is_dir else -(-info.size // BLOCK_SIZE) * 8
        mtime = info.mtime * 10**9 + info.mtime_nsec
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        return attr

    # -- metadata -----------------------------------------------------------------------------------

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.stats.lookups += 1
        parent = self._inode(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            nid = self.boot.lookup(parent, bytes(name))
        except LazyfsError as exc:
            log.error("event=bad_directory nid=%d error=%s", parent.nid, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if nid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._inode(self._ino(nid)))

    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        info = self._inode(inode)
        if not stat.S_ISLNK(info.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.boot.readlink(info)

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._inode(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        info = self._inode(fh)
        try:
            entries = [e for e in self.boot.readdir(info) if e[0] not in (b".", b"..")]
        except LazyfsError as exc:
            log.error("event=bad_directory nid=%d error=%s", info.nid, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        for index in range(start_id, len(entries)):
            name, nid, _ = entries[index]
            attrs = self._attrs(self._inode(self._ino(nid)))
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        value = self.boot.xattrs(self._inode(inode)).get(bytes(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        return [k for k in self.boot.xattrs(self._inode(inode))]

    async def access(self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            return False
        info = self._inode(inode)
        if ctx.uid == 0:
            return not mode & os.X_OK or bool(info.mode & 0o111) or info.is_dir
        shift = 6 if ctx.uid == info.uid else 3 if ctx.gid == info.gid else 0
        wanted = ((mode & os.R_OK) and 4) | ((mode & os.X_OK) and 1)
        return (info.mode >> shift) & wanted == wanted

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = sum(b.uncompressed_size for b in self.boot.blobs) // BLOCK_SIZE
        data.f_bfree = data.f_bavail = 0
        data.f_files = self.boot.sb.inos
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- file data ----------------------------------------------------------------------------------

    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        info = self._inode(inode)
        if not stat.S_ISREG(info.mode):
            raise pyfuse3.FUSEError(errno.EISDIR if info.is_dir else errno.EINVAL)
        try:
            chunks = self.boot.chunks(info)
        except LazyfsError as exc:
            log.error("event=bad_chunks nid=%d error=%s", info.nid, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _OpenFile(info, chunks)
        self.stats.opens += 1
        self.opened.setdefault(info.nid, None)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._files[fh]
        end = min(off + size, handle.info.size)
        if off >= end:
            return b""
        chunk_size = self.boot.sb.chunk_size
        first, last = off // chunk_size, (end - 1) // chunk_size
        spans = [
            (ref, max(off - k * chunk_size, 0), min(end - k * chunk_size, ref.uncompressed_size))
            for k, ref in enumerate(handle.chunks[first : last + 1], first)
        ]
        try:
            out = b"".join(await self._read_spans(spans))
        except LazyfsError as exc:
            self.stats.read_errors += 1
            log.error("event=read_failed nid=%d offset=%d size=%d error=%s", handle.info.nid, off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.stats.reads += 1
        self.stats.read_bytes += len(out)
        self._read_ahead(handle, off, end, last)
        return out

    def _read_ahead(self, handle: _OpenFile, off: int, end: int, last: int) -> None:
        """Start fetching the next chunks in the background once the file is read sequentially: this read
        continues the previous one (a first read, e.g. an ELF header before mmap, proves nothing)."""
        sequential = 0 < handle.next_offset == off
        handle.next_offset = end
        if self.readahead is None or not sequential:
            return
        nursery, count = self.readahead
        begin = max(last + 1, handle.readahead_end)
        stop = min(last + 1 + count, len(handle.chunks))
        if begin < stop:
            handle.readahead_end = stop
            nursery.start_soon(self._prefetch_quietly, handle.chunks[begin:stop])

    async def _prefetch_quietly(self, refs: list[ChunkRef]) -> None:
        try:
            for blob_index, run in itertools.groupby(refs, key=lambda ref: ref.blob_index):
                await self.source.read_ahead(self.boot.blobs[blob_index], list(run))
        except LazyfsError as exc:  # the reader itself will get EIO if it gets there
            log.info("event=readahead_failed error=%s", exc)

    async def _read_spans(self, spans: list[tuple[ChunkRef, int, int]]) -> list[bytes]:
        """Chunk byte ranges in order, asking the source once per run of chunks from the same blob."""
        out: list[bytes] = []
        start = 0
        while start < len(spans):
            blob_index = spans[start][0].blob_index
            stop = start
            while stop < len(spans) and spans[stop][0].blob_index == blob_index:
                stop += 1
            out += await self.source.read_ranges(self.boot.blobs[blob_index], spans[start:stop])
            start = stop
        return out

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._files.pop(fh, None)
