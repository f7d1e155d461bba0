"""The in-memory filesystem tree that builders produce and the bootstrap writer consumes.

A :class:`Tree` is format-neutral: sources (a directory, a layer tar, a read bootstrap) fill it, and
:mod:`lazyfs.rafs.writer` lays it out as RAFS v6. Hardlinks are one :class:`Inode` object reachable
under several names; ``nlink`` is derived when the tree is written.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import UnsafeEntryError

DEFAULT_CHUNK_SIZE = 0x100000
BLOCK_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one chunk of file data lives in a data blob."""

    blob_index: int
    index: int  # position in the blob's chunk-info array ("ci_index")
    digest: bytes  # digest of the uncompressed data
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int  # 4 KiB aligned in v6 (v5 blobs are unaligned)
    uncompressed_size: int

    @property
    def compressed(self) -> bool:
        """Whether the stored bytes must be decompressed (stored raw otherwise)."""
        return self.compressed_size != self.uncompressed_size


@dataclass(frozen=True, slots=True)
class TocInfo:
    """The TOC trailer of a data blob, as the blob table records it."""

    digest: bytes  # sha256(TOC entries || TOC tar header)
    size: int  # TOC entries + 512


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob referenced by a bootstrap (one entry of the RAFS v6 blob table)."""

    blob_id: str  # 64 hex characters: the layer digest in OCI images
    chunk_count: int
    chunk_size: int
    compressor: Compressor
    digester: Digester
    features: int
    compressed_size: int
    uncompressed_size: int
    ci_compressor: Compressor
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    toc: TocInfo | None = None


@dataclass(eq=False, slots=True)
class Inode:
    """One inode. Directories hold ``entries``; hardlinks share the same object."""

    mode: int  # full st_mode, type bits included
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlink target
    chunks: list[ChunkRef] = field(default_factory=list)
    entries: dict[bytes, Inode] | None = None
    implicit: bool = False  # a directory the source never described (a layer tar's missing parent)

    @classmethod
    def directory(cls, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
        """A new empty directory inode."""
        return cls(mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid, mtime=mtime, entries={})

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return self.entries is not None

    def take_attrs(self, src: Inode) -> None:
        """Give this directory the attributes of *src*, keeping its entries."""
        self.mode, self.uid, self.gid = src.mode, src.uid, src.gid
        self.mtime, self.mtime_nsec, self.xattrs = src.mtime, src.mtime_nsec, dict(src.xattrs)
        self.implicit = src.implicit

    def children(self) -> dict[bytes, Inode]:
        """The directory's entries; raises for non-directories."""
        if self.entries is None:
            raise NotADirectoryError("not a directory")
        return self.entries


def check_name(name: bytes) -> bytes:
    """Return *name* if it is a valid single path component, else raise UnsafeEntryError."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafeEntryError(f"invalid file name {name!r}")
    if len(name) > 255:
        raise UnsafeEntryError(f"file name longer than 255 bytes: {name[:40]!r}...")
    return name


def split_path(path: bytes) -> list[bytes]:
    """Split a relative or absolute path into checked components, refusing ``..``."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    return [check_name(p) for p in parts]


@dataclass(eq=False)
class Tree:
    """A whole filesystem: root directory, the blobs its chunks live in, and build settings."""

    root: Inode = field(default_factory=Inode.directory)
    blobs: list[BlobInfo] = field(default_factory=list)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prefetch: list[bytes] = field(default_factory=list)  # absolute paths to prefetch

    def lookup(self, path: bytes) -> Inode | None:
        """The inode at *path*, or None."""
        node = self.root
        for part in split_path(path):
            if node.entries is None or part not in node.entries:
                return None
            node = node.entries[part]
        return node

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every (absolute path, inode) pair, parents before children, names sorted bytewise."""
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.entries is not None:
                base = path.rstrip(b"/")
                for name in sorted(node.entries, reverse=True):
                    stack.append((base + b"/" + name, node.entries[name]))
