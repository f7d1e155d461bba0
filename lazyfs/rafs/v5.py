"""Read RAFS v5 bootstraps (nydus-format.md §2) into a :class:`~lazyfs.rafs.tree.Tree`.

A v5 bootstrap is an 8192-byte superblock, an inode table of ``offset >> 3`` values indexed by a
1-based "child index" (the root is 1), a blob table, an optional extended blob table, a prefetch
table of inode numbers, and 128-byte inode records, each followed by its name, symlink target,
xattrs and 80-byte chunk infos. A directory's children are the table entries
``[child_index, child_index + child_count)``; hardlinks are duplicated records sharing ``i_ino``.

The input is untrusted: every offset is bounds-checked, inode records must not overlap (so the work
is linear in the input size), and every record is reached at most once because child ranges only
point forward and must agree with each child's parent (so there are no loops). Only
:class:`~lazyfs.errors.FormatError` escapes.
"""

from __future__ import annotations

import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import NamedTuple

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import verify
from lazyfs.errors import FormatError, UnsafeEntryError
from lazyfs.rafs import layout as L
from lazyfs.rafs.reader import V5_MAGIC, decode_rdev
from lazyfs.rafs.tree import BlobInfo, ChunkRef, Inode, Tree, check_name

V5_VERSION = 0x500
SUPER_SIZE = 8192
INODE_SIZE = 128
EXT_BLOB_ENTRY_SIZE = 64
MAX_CHUNK_SIZE = 0x1000000
MAX_BLOB_CHUNKS = 1 << 24

# RafsV5InodeFlags used here (SYMLINK 0x1 and HARDLINK 0x2 are not needed: mode and i_ino tell)
INODE_XATTR = 0x4
INODE_HAS_HOLE = 0x8

_KNOWN_SUPER_FLAGS = (
    sum(L.COMPRESSION_FLAGS.values()) | sum(L.DIGEST_FLAGS.values()) | L.FLAG_EXPLICIT_UID_GID | L.FLAG_HAS_XATTR
    | L.FLAG_INLINED_CHUNK_DIGEST
)
_UNSUPPORTED_CHUNK_FLAGS = L.CHUNK_HOLE | L.CHUNK_ENCRYPTED | L.CHUNK_BATCH
_FILE_TYPES = frozenset(
    {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)
_BLOB_ID = re.compile(rb"[0-9a-f]{64}")
_SUPER = struct.Struct("<IIIIQQQQQIIIIQ")
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
_EXT_BLOB = struct.Struct("<IIQQ40x")


class _SuperFields(NamedTuple):
    magic: int
    version: int
    sb_size: int
    chunk_size: int
    flags: int
    inodes_count: int
    inode_table_offset: int
    prefetch_table_offset: int
    blob_table_offset: int
    inode_table_entries: int
    prefetch_entries: int
    blob_table_size: int
    ext_blob_entries: int
    ext_blob_table_offset: int


class _InodeHeader(NamedTuple):
    digest: bytes
    parent: int
    ino: int
    uid: int
    gid: int
    projid: int
    mode: int
    size: int
    blocks: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    name_size: int
    symlink_size: int
    rdev: int
    mtime_nsec: int
    mtime: int


class _ExtBlob(NamedTuple):
    chunk_count: int
    features: int
    uncompressed_size: int
    compressed_size: int


@dataclass(frozen=True, slots=True)
class _Record:
    """One inode record: its table index, where it lies and its fixed header."""

    index: int  # 1-based inode table index ("child index")
    offset: int
    end: int
    head: _InodeHeader


@dataclass(frozen=True, slots=True)
class _Body:
    """The variable part of an inode record."""

    name: bytes
    target: bytes
    xattrs: dict[bytes, bytes]
    chunks: list[L.ChunkInfo]


def _align8(value: int) -> int:
    return (value + 7) & ~7


def read_v5(data: bytes, name: str = "bootstrap", *, verify_digests: bool = False) -> Tree:
    """Parse a whole RAFS v5 bootstrap.

    With *verify_digests*, every file, symlink and directory must also match its inode digest
    (the hash of its chunk digests, its target, or its children's digests in name order), else
    :class:`~lazyfs.errors.DigestMismatch` is raised.
    """
    return _V5Reader(data, name, verify_digests).tree()


class _V5Reader:
    """Validates a v5 bootstrap and loads it into a Tree."""

    def __init__(self, data: bytes, name: str, verify_digests: bool) -> None:
        self.data = data
        self.name = name
        self.verify = verify_digests
        self.sb = self._read_super()
        self.chunk_size = self.sb.chunk_size
        try:
            self.compressor, self.digester = L.algorithms_from_flags(self.sb.flags)
        except FormatError as exc:
            raise self.fail(str(exc)) from None
        self.blob_ids = self._read_blob_ids()
        self.ext = self._read_ext_blobs()
        self.records = self._read_records()

    def fail(self, msg: str) -> FormatError:
        """A FormatError naming the bootstrap."""
        return FormatError(f"{self.name}: {msg}")

    # -- superblock and tables ------------------------------------------------------------------

    def _read_super(self) -> _SuperFields:
        size = len(self.data)
        if size <= SUPER_SIZE:
            raise self.fail(f"truncated: {size} bytes, a RAFS v5 bootstrap needs more than {SUPER_SIZE}")
        sb = _SuperFields._make(_SUPER.unpack_from(self.data))
        if sb.magic != V5_MAGIC or sb.version != V5_VERSION:
            raise self.fail(f"magic {sb.magic:#x} version {sb.version:#x} is not RAFS v5 (0x500)")
        if sb.sb_size != SUPER_SIZE:
            raise self.fail(f"superblock size {sb.sb_size} != {SUPER_SIZE}")
        if sb.chunk_size & (sb.chunk_size - 1) or not 0x1000 <= sb.chunk_size <= MAX_CHUNK_SIZE:
            raise self.fail(f"invalid chunk size {sb.chunk_size:#x}")
        if sb.flags & ~_KNOWN_SUPER_FLAGS:
            raise self.fail(f"unknown superblock flags {sb.flags & ~_KNOWN_SUPER_FLAGS:#x}")
        entries = sb.inode_table_entries
        if not 0 < entries <= size // INODE_SIZE or sb.inodes_count > entries:
            raise self.fail(f"inode table of {entries} entries ({sb.inodes_count} inodes) is impossible")
        self._check_tables([
            ("inode table", sb.inode_table_offset, 4 * entries),
            ("blob table", sb.blob_table_offset, sb.blob_table_size),
            ("extended blob table", sb.ext_blob_table_offset, EXT_BLOB_ENTRY_SIZE * sb.ext_blob_entries),
            ("prefetch table", sb.prefetch_table_offset, 4 * sb.prefetch_entries),
        ])
        return sb

    def _check_tables(self, tables: list[tuple[str, int, int]]) -> None:
        """Every non-empty table lies after the superblock, inside the data, and apart from the others."""
        used = sorted((off, off + length, what) for what, off, length in tables if length)
        for start, end, what in used:
            if start < SUPER_SIZE or end > len(self.data):
                raise self.fail(f"{what} [{start}, {end}) outside [{SUPER_SIZE}, {len(self.data)})")
        for (_, end, what), (start, _, other) in pairwise(used):
            if end > start:
                raise self.fail(f"{what} overlaps the {other}")

    def _read_blob_ids(self) -> list[str]:
        """Blob ids from ``{readahead offset u32, readahead size u32, id}`` entries split by NUL."""
        start = self.sb.blob_table_offset
        raw = self.data[start : start + self.sb.blob_table_size]
        ids: list[str] = []
        pos = 0
        while len(raw) - pos > 8:
            end = raw.find(b"\0", pos + 8)
            end = len(raw) if end < 0 else end
            if not _BLOB_ID.fullmatch(raw[pos + 8 : end]):
                raise self.fail(f"blob table entry {len(ids)} has an invalid id {raw[pos + 8 : end][:80]!r}")
            ids.append(raw[pos + 8 : end].decode("ascii"))
            pos = end + 1
        if raw[pos:].strip(b"\0"):
            raise self.fail("blob table ends with garbage")
        return ids

    def _read_ext_blobs(self) -> list[_ExtBlob]:
        base, count = self.sb.ext_blob_table_offset, self.sb.ext_blob_entries
        ext = [_ExtBlob._make(_EXT_BLOB.unpack_from(self.data, base + i * EXT_BLOB_ENTRY_SIZE)) for i in range(count)]
        if ext and len(ext) < len(self.blob_ids):
            raise self.fail(f"extended blob table has {len(ext)} entries for {len(self.blob_ids)} blobs")
        if any(e.chunk_count > MAX_BLOB_CHUNKS for e in ext):
            raise self.fail("extended blob table entry with an impossible chunk count")
        return ext

    # -- inode records --------------------------------------------------------------------------

    def _read_records(self) -> list[_Record]:
        """Every inode record's header, checked not to overlap another record."""
        count = self.sb.inode_table_entries
        table = struct.unpack_from(f"<{count}I", self.data, self.sb.inode_table_offset)
        records = [self._record(i + 1, value << 3) for i, value in enumerate(table)]
        ordered = sorted(records, key=lambda r: r.offset)
        for a, b in pairwise(ordered):
            if a.end > b.offset:
                raise self.fail(f"inode records {a.index} and {b.index} overlap")
        return records

    def _record(self, index: int, offset: int) -> _Record:
        if offset < SUPER_SIZE or offset + INODE_SIZE > len(self.data):
            raise self.fail(f"inode {index} at offset {offset} lies outside the bootstrap")
        head = _InodeHeader._make(_INODE.unpack_from(self.data, offset))
        self._check_header(index, head)
        length = INODE_SIZE + _align8(head.name_size) + _align8(head.symlink_size)
        if head.flags & INODE_XATTR:
            if offset + length + 8 > len(self.data):
                raise self.fail(f"inode {index}: xattr table lies outside the bootstrap")
            length += 8 + _align8(int.from_bytes(self.data[offset + length : offset + length + 8], "little"))
        if stat.S_ISREG(head.mode):
            length += head.child_count * L.CHUNK_INFO_SIZE
        if offset + length > len(self.data):
            raise self.fail(f"inode {index} ({length} bytes at {offset}) runs past the end of the bootstrap")
        return _Record(index, offset, offset + length, head)

    def _check_header(self, index: int, h: _InodeHeader) -> None:
        fmt = stat.S_IFMT(h.mode)
        if h.mode > 0o177777 or fmt not in _FILE_TYPES:
            raise self.fail(f"inode {index} has an invalid mode {h.mode:#o}")
        if h.ino == 0 or h.name_size == 0 or h.mtime_nsec >= 10**9:
            raise self.fail(f"inode {index} has a zero inode number, an empty name or bad mtime")
        if (fmt == stat.S_IFLNK) != (h.symlink_size > 0):
            raise self.fail(f"inode {index}: only symlinks, and every symlink, must have a target")
        if fmt == stat.S_IFREG and h.child_count != -(-h.size // self.sb.chunk_size):
            hole = " (sparse files with hole chunks are not supported)" if h.flags & INODE_HAS_HOLE else ""
            raise self.fail(f"inode {index}: {h.child_count} chunks for a {h.size}-byte file{hole}")
        if fmt == stat.S_IFDIR and h.child_count and not (
            index < h.child_index and h.child_index + h.child_count - 1 <= self.sb.inode_table_entries
        ):
            raise self.fail(f"directory {index}: children {h.child_index}+{h.child_count} out of range")

    def body(self, rec: _Record) -> _Body:
        """Name, symlink target, xattrs and chunk infos of a record (its extent was checked)."""
        h = rec.head
        pos = rec.offset + INODE_SIZE
        name = self.data[pos : pos + h.name_size]
        pos += _align8(h.name_size)
        target = self.data[pos : pos + h.symlink_size]
        pos += _align8(h.symlink_size)
        if b"\0" in target:
            raise self.fail(f"inode {rec.index}: symlink target contains NUL")
        xattrs: dict[bytes, bytes] = {}
        if h.flags & INODE_XATTR:
            size = int.from_bytes(self.data[pos : pos + 8], "little")
            xattrs = self._xattrs(rec, self.data[pos + 8 : pos + 8 + size])
            pos += 8 + _align8(size)
        count = h.child_count if stat.S_ISREG(h.mode) else 0
        chunks = [L.ChunkInfo.unpack(self.data, pos + k * L.CHUNK_INFO_SIZE) for k in range(count)]
        return _Body(name, target, xattrs, chunks)

    def _xattrs(self, rec: _Record, raw: bytes) -> dict[bytes, bytes]:
        """``{u32 size, name NUL value}`` pairs filling *raw* exactly."""
        out: dict[bytes, bytes] = {}
        pos = 0
        while pos < len(raw):
            size = int.from_bytes(raw[pos : pos + 4], "little")
            pair = raw[pos + 4 : pos + 4 + size]
            key, sep, value = pair.partition(b"\0")
            if pos + 4 > len(raw) or len(pair) != size or not sep or not 0 < len(key) <= 255 or key in out:
                raise self.fail(f"inode {rec.index} has a malformed xattr table")
            out[key] = value
            pos += 4 + size
        return out

    # -- the tree -------------------------------------------------------------------------------

    def tree(self) -> Tree:
        """Walk the directory tree from the root and assemble the :class:`Tree`."""
        root = self.records[0]
        if not stat.S_ISDIR(root.head.mode):
            raise self.fail("inode 1 (the root) is not a directory")
        walk = _Walk(self, root)
        walk.run()
        files = {ino: self._chunk_refs(rec, walk.bodies[ino].chunks)
                 for ino, rec in walk.records.items() if stat.S_ISREG(rec.head.mode)}
        refs = [r for file_refs in files.values() for r in file_refs]
        numbering = self._recorded_indexes(refs) if self.ext else _renumber(refs, len(self.blob_ids))
        for ino, file_refs in files.items():
            walk.nodes[ino].chunks = [replace(r, index=numbering[replace(r, index=0)]) for r in file_refs]
        numbered = [r for ino in files for r in walk.nodes[ino].chunks]
        return Tree(root=walk.nodes[root.head.ino], blobs=self._blob_infos(numbered), chunk_size=self.chunk_size,
                    prefetch=self._prefetch(walk.paths))

    def node(self, rec: _Record, body: _Body) -> Inode:
        """A new :class:`Inode` for a record."""
        h = rec.head
        fmt = stat.S_IFMT(h.mode)
        node = Inode(mode=h.mode, uid=h.uid, gid=h.gid, mtime=h.mtime, mtime_nsec=h.mtime_nsec,
                     rdev=decode_rdev(h.rdev) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0, xattrs=body.xattrs)
        if fmt == stat.S_IFDIR:
            node.entries = {}
        elif fmt == stat.S_IFLNK:
            node.target = body.target
            node.size = len(body.target)
        elif fmt == stat.S_IFREG:
            node.size = h.size
        return node

    def children(self, rec: _Record) -> list[_Record]:
        """A directory's child records (ranges were checked by :meth:`_check_header`)."""
        first = rec.head.child_index
        return self.records[first - 1 : first - 1 + rec.head.child_count] if rec.head.child_count else []

    def entry_name(self, rec: _Record, raw: bytes) -> bytes:
        """A checked single path component."""
        try:
            return check_name(raw)
        except UnsafeEntryError as exc:
            raise self.fail(f"inode {rec.index}: {exc}") from None

    def check_digest(self, rec: _Record, payload: bytes, path: bytes) -> None:
        """With digest verification on, the record's digest must be H(*payload*)."""
        if self.verify:
            verify(self.digester, payload, rec.head.digest, f"{self.name}: inode {rec.index} ({path!r})")

    # -- chunks and blobs -----------------------------------------------------------------------

    def _chunk_refs(self, rec: _Record, infos: list[L.ChunkInfo]) -> list[ChunkRef]:
        """ChunkRefs (with the recorded ci indexes) after checking each chunk covers its part of the file."""
        cs = self.chunk_size
        refs = []
        for k, c in enumerate(infos):
            if c.blob_index >= len(self.blob_ids) or c.flags & _UNSUPPORTED_CHUNK_FLAGS:
                raise self.fail(f"inode {rec.index} chunk {k} names blob {c.blob_index} or has flags {c.flags:#x}")
            if c.file_offset != k * cs or c.uncompressed_size != min(cs, rec.head.size - k * cs):
                raise self.fail(f"inode {rec.index} chunk {k} does not cover its part of the file")
            compressed = bool(c.flags & L.CHUNK_COMPRESSED)
            csize = c.compressed_size if compressed else c.uncompressed_size
            if csize == 0 or csize > 2 * cs or (compressed and csize == c.uncompressed_size):
                raise self.fail(f"inode {rec.index} chunk {k} has an implausible compressed size {csize}")
            refs.append(ChunkRef(c.blob_index, c.index, c.digest, c.compressed_offset, csize,
                                 c.uncompressed_offset, c.uncompressed_size))
        return refs

    def _recorded_indexes(self, refs: list[ChunkRef]) -> dict[ChunkRef, int]:
        """The recorded ci index of each distinct chunk (keyed with index 0), checked for consistency.

        With an extended blob table nydusd addresses chunks by these indexes.
        """
        out: dict[ChunkRef, int] = {}
        owner: dict[tuple[int, int], ChunkRef] = {}
        for r in refs:
            key = replace(r, index=0)
            if r.index >= self.ext[r.blob_index].chunk_count:
                raise self.fail(f"chunk index {r.index} beyond blob {r.blob_index}'s chunk count")
            if out.setdefault(key, r.index) != r.index or owner.setdefault((r.blob_index, r.index), key) != key:
                raise self.fail(f"blob {r.blob_index} chunk index {r.index} names different chunks")
        return out

    def _blob_infos(self, refs: list[ChunkRef]) -> list[BlobInfo]:
        """BlobInfo per blob: sizes from the extended table, else computed from the chunks."""
        counts, csizes, usizes = ([0] * len(self.blob_ids) for _ in range(3))
        for r in refs:
            i = r.blob_index
            counts[i] = max(counts[i], r.index + 1)
            csizes[i] = max(csizes[i], r.compressed_offset + r.compressed_size)
            usizes[i] = max(usizes[i], r.uncompressed_offset + r.uncompressed_size)
        out = []
        for i, blob_id in enumerate(self.blob_ids):
            features, count, csize, usize = 0, counts[i], csizes[i], usizes[i]
            if self.ext:
                e = self.ext[i]
                features, count, csize, usize = e.features, e.chunk_count, e.compressed_size, e.uncompressed_size
            out.append(BlobInfo(
                blob_id=blob_id, chunk_count=count, chunk_size=self.chunk_size, compressor=self.compressor,
                digester=self.digester, features=features, compressed_size=csize, uncompressed_size=usize,
                ci_compressor=Compressor.NONE, ci_offset=0, ci_compressed_size=0, ci_uncompressed_size=0,
            ))
        return out

    def _prefetch(self, paths: dict[int, bytes]) -> list[bytes]:
        """Paths of the inode numbers in the prefetch table (up to a 0 terminator)."""
        count = self.sb.prefetch_entries
        inos = struct.unpack_from(f"<{count}I", self.data, self.sb.prefetch_table_offset) if count else ()
        out = []
        for ino in inos:
            if ino == 0:
                break
            if ino in paths:
                out.append(paths[ino])
        return out


class _Walk:
    """Depth-first walk over the directory records, building shared inodes for hardlinks.

    No record is reached twice, so the walk is linear and loop-free: child ranges point strictly
    forward (never at the root or an ancestor), a child must name its directory's ``i_ino`` as parent,
    and no directory shares its ``i_ino``, so each record has at most one directory listing it.
    """

    def __init__(self, reader: _V5Reader, root: _Record) -> None:
        self.r = reader
        body = reader.body(root)
        self.nodes: dict[int, Inode] = {root.head.ino: reader.node(root, body)}  # by i_ino
        self.records: dict[int, _Record] = {root.head.ino: root}  # first record of each i_ino
        self.bodies: dict[int, _Body] = {root.head.ino: body}
        self.paths: dict[int, bytes] = {root.head.ino: b"/"}
        self.stack = [root]

    def run(self) -> None:
        """Visit every directory reachable from the root."""
        while self.stack:
            self._directory(self.stack.pop())

    def _directory(self, rec: _Record) -> None:
        parent = self.nodes[rec.head.ino]
        entries = parent.children()
        path = self.paths[rec.head.ino]
        digests: list[tuple[bytes, bytes]] = []
        for child in self.r.children(rec):
            if child.head.parent != rec.head.ino:
                raise self.r.fail(f"inode {child.index} names parent {child.head.parent}, not {rec.head.ino}")
            body = self.r.body(child)
            name = self.r.entry_name(child, body.name)
            if name in entries:
                raise self.r.fail(f"directory {path!r} lists {name!r} twice")
            entries[name] = self._child(child, body, path.rstrip(b"/") + b"/" + name)
            digests.append((name, child.head.digest))
        self.r.check_digest(rec, b"".join(d for _, d in sorted(digests)), path)

    def _child(self, rec: _Record, body: _Body, path: bytes) -> Inode:
        """The inode for a child record: new, or the one it is a hardlink of."""
        h = rec.head
        if stat.S_ISREG(h.mode):
            self.r.check_digest(rec, b"".join(c.digest for c in body.chunks), path)
        elif stat.S_ISLNK(h.mode):
            self.r.check_digest(rec, body.target, path)
        first = self.records.get(h.ino)
        if first is not None:
            if stat.S_ISDIR(h.mode) or _identity(first, self.bodies[h.ino]) != _identity(rec, body):
                raise self.r.fail(f"inode {rec.index} shares i_ino {h.ino} with a different inode")
            return self.nodes[h.ino]
        node = self.r.node(rec, body)
        self.nodes[h.ino], self.records[h.ino], self.bodies[h.ino], self.paths[h.ino] = node, rec, body, path
        if stat.S_ISDIR(h.mode):
            self.stack.append(rec)
        return node


def _identity(rec: _Record, body: _Body) -> tuple[object, ...]:
    """What hardlinked records must agree on."""
    h = rec.head
    return (h.mode, h.uid, h.gid, h.size, h.mtime, h.mtime_nsec, h.rdev, body.target, body.xattrs, body.chunks)


def _renumber(refs: Iterable[ChunkRef], blob_count: int) -> dict[ChunkRef, int]:
    """Fresh ci indexes (keyed with index 0), per blob in compressed-offset order.

    Used without an extended blob table: nydusd then finds chunks by digest, and old builders
    record index 0 for every chunk.
    """
    keys = sorted({replace(r, index=0) for r in refs},
                  key=lambda r: (r.blob_index, r.compressed_offset, r.uncompressed_offset, r.digest))
    counts = [0] * blob_count
    out = {}
    for key in keys:
        out[key] = counts[key.blob_index]
        counts[key.blob_index] += 1
    return out
