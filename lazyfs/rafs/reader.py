"""Read RAFS v6 bootstraps: superblock validation, inodes by nid, directories, xattrs, chunks.

:class:`Bootstrap` answers the questions a filesystem asks (getattr, lookup, readdir, readlink,
getxattr, which chunks back a file) without loading the whole tree; :meth:`Bootstrap.to_tree` loads
it all for merge, unpack and export. Every offset read from the image is bounds-checked: a hostile
bootstrap yields :class:`~lazyfs.errors.FormatError`, never a crash or a hang.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import FormatError, UnsafeEntryError
from lazyfs.rafs import layout as L
from lazyfs.rafs.tree import BLOCK_SIZE, BlobInfo, ChunkRef, Inode, TocInfo, Tree, check_name

V5_MAGIC = 0x52414653
MAX_DIR_SIZE = 1 << 31
INODE_CACHE_SIZE = 1 << 16
DIR_CACHE_SIZE = 1024


def decode_rdev(value: int) -> int:
    """Linux ``new_decode_dev`` of an on-disk 32-bit device number, as an ``os.makedev`` value."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


@dataclass(frozen=True, slots=True)
class InodeInfo:
    """The attributes of one on-disk inode."""

    nid: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    nlink: int
    rdev: int
    layout: int
    i_u: int
    xattr_icount: int
    isize: int  # 32 (compact) or 64 (extended)

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def xattr_size(self) -> int:
        """Bytes of inline xattrs following the inode."""
        return L.xattr_ibody_size(self.xattr_icount)


def detect_version(data: bytes | memoryview | mmap.mmap) -> int:
    """5 or 6, from the magic numbers; FormatError for anything else."""
    if len(data) >= 8 and int.from_bytes(data[0:4], "little") == V5_MAGIC:
        return 5
    if len(data) >= L.SUPER_OFFSET + 4 and int.from_bytes(data[1024:1028], "little") == L.EROFS_MAGIC:
        return 6
    raise FormatError("not a Nydus bootstrap: neither RAFS v5 nor RAFS v6 (EROFS) magic found")


class Bootstrap:
    """A validated RAFS v6 bootstrap held in memory or memory-mapped."""

    def __init__(self, data: bytes | mmap.mmap, name: str = "bootstrap") -> None:
        self.buf = data
        self.name = name
        if detect_version(data) == 5:
            raise FormatError(f"{name}: RAFS v5 bootstrap; use lazyfs.rafs.v5 to read it")
        self.sb = L.SuperBlock.unpack(bytes(data[: L.DEVSLOT_OFFSET]))
        self._validate_super()
        try:
            self.compressor, self.digester = L.algorithms_from_flags(self.sb.flags)
        except FormatError as exc:
            raise self._fail(str(exc)) from None
        self.meta_base = self.sb.meta_blkaddr * BLOCK_SIZE
        self.blobs = self._read_blobs()
        self._inodes: dict[int, InodeInfo] = {}
        self._dirs: OrderedDict[int, dict[bytes, int]] = OrderedDict()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bootstrap:
        """Memory-map a bootstrap file."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise FormatError(f"{path}: empty file")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(data, str(path))

    def _fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.name}: {msg}")

    def _validate_super(self) -> None:
        sb, size = self.sb, len(self.buf)
        if sb.blkszbits != 12:
            raise self._fail(f"block size 2^{sb.blkszbits} unsupported (RAFS v6 uses 4096)")
        if not sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6:
            raise self._fail("EROFS image without the RAFS v6 feature bit (not made by a Nydus builder)")
        if sb.feature_incompat & ~L.RAFS_V6_INCOMPAT:
            raise self._fail(f"unsupported EROFS incompat features {sb.feature_incompat:#x}")
        if sb.chunk_size & (sb.chunk_size - 1) or not 0x1000 <= sb.chunk_size <= 0x1000000:
            raise self._fail(f"invalid chunk size {sb.chunk_size:#x}")
        if not 0 < self.sb.meta_blkaddr * BLOCK_SIZE < size:
            raise self._fail(f"meta_blkaddr {sb.meta_blkaddr} outside the {size}-byte bootstrap")
        if sb.xattr_blkaddr:
            raise self._fail("shared xattrs are not supported by RAFS v6")
        self._check_range(sb.blob_table_offset, sb.blob_table_size, "blob table")
        self._check_range(sb.chunk_table_offset, sb.chunk_table_size, "chunk table")
        self._check_range(sb.prefetch_table_offset, sb.prefetch_table_size, "prefetch table")
        if sb.blob_table_size != sb.extra_devices * L.BLOB_ENTRY_SIZE:
            raise self._fail(f"blob table size {sb.blob_table_size} != {sb.extra_devices} devices")
        if sb.chunk_table_size % L.CHUNK_INFO_SIZE:
            raise self._fail(f"chunk table size {sb.chunk_table_size} is not a multiple of 80")
        if sb.prefetch_table_size % 4:
            raise self._fail("prefetch table size is not a multiple of 4")
        if sb.devt_slotoff * L.DEVSLOT_SIZE + sb.extra_devices * L.DEVSLOT_SIZE > size:
            raise self._fail("device table extends past the end of the bootstrap")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if length and (offset < 0 or offset + length > len(self.buf)):
            raise self._fail(f"{what} [{offset}, +{length}) outside the {len(self.buf)}-byte bootstrap")

    def _read_blobs(self) -> list[BlobInfo]:
        blobs = []
        for i in range(self.sb.extra_devices):
            e = L.BlobEntry.unpack(self.buf, self.sb.blob_table_offset + i * L.BLOB_ENTRY_SIZE)
            try:
                blob_id = e.blob_id.decode("ascii").rstrip("\0")
                compressor, digester = Compressor(e.compressor), Digester(e.digester)
                ci_compressor = Compressor(e.ci_compressor)
            except (UnicodeDecodeError, ValueError):
                raise self._fail(f"blob table entry {i} has an invalid id or algorithm") from None
            if e.blob_index != i or e.chunk_size != self.sb.chunk_size or e.chunk_count > 1 << 24:
                raise self._fail(f"blob table entry {i} is inconsistent (index, chunk size or count)")
            toc = TocInfo(e.toc_digest, e.toc_size) if e.toc_size else None
            blobs.append(BlobInfo(
                blob_id, e.chunk_count, e.chunk_size, compressor, digester, e.features, e.compressed_size,
                e.uncompressed_size, ci_compressor, e.ci_offset, e.ci_compressed_size, e.ci_uncompressed_size,
                toc,
            ))
        return blobs

    # -- inodes ---------------------------------------------------------------------------------

    @property
    def root_nid(self) -> int:
        """The nid of the root directory."""
        return self.sb.root_nid

    def _bytes(self, offset: int, length: int, what: str) -> bytes:
        self._check_range(offset, length, what)
        return bytes(self.buf[offset : offset + length])

    def inode_offset(self, nid: int) -> int:
        """Byte offset of inode *nid* in the bootstrap."""
        return self.meta_base + nid * L.INODE_SLOT

    def inode(self, nid: int) -> InodeInfo:
        """Inode *nid*, decoded once and then cached."""
        info = self._inodes.get(nid)
        if info is None:
            if len(self._inodes) >= INODE_CACHE_SIZE:
                self._inodes.clear()
            info = self._inodes[nid] = self._decode_inode(nid)
        return info

    def _decode_inode(self, nid: int) -> InodeInfo:
        off = self.inode_offset(nid)
        head = self._bytes(off, L.COMPACT_INODE_SIZE, f"inode {nid}")
        fmt = int.from_bytes(head[0:2], "little")
        layout = (fmt >> 1) & 0x7
        if fmt & ~0xF or layout not in (L.LAYOUT_FLAT_PLAIN, L.LAYOUT_FLAT_INLINE, L.LAYOUT_CHUNK_BASED):
            raise self._fail(f"inode {nid} has unsupported format {fmt:#x}")
        if fmt & 1:
            f = L.EXTENDED_INODE.unpack(self._bytes(off, L.EXTENDED_INODE_SIZE, f"inode {nid}"))
            _, icount, mode, _, size, i_u, _, uid, gid, mtime, nsec, nlink, _ = f
            isize = L.EXTENDED_INODE_SIZE
        else:
            _, icount, mode, nlink, size, _, i_u, _, uid, gid, _ = L.COMPACT_INODE.unpack(head)
            mtime = nsec = 0
            isize = L.COMPACT_INODE_SIZE
        rdev = decode_rdev(i_u) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        if stat.S_ISREG(mode) != (layout == L.LAYOUT_CHUNK_BASED):
            raise self._fail(f"inode {nid}: regular files must be chunk-based and nothing else")
        return InodeInfo(nid, mode, uid, gid, size, mtime, nsec, nlink, rdev, layout, i_u, icount, isize)

    def _inline_offset(self, ino: InodeInfo) -> int:
        return self.inode_offset(ino.nid) + ino.isize + ino.xattr_size

    def flat_data(self, ino: InodeInfo) -> bytes:
        """The whole content of a directory or symlink (full blocks plus inline tail)."""
        if ino.size > MAX_DIR_SIZE:
            raise self._fail(f"inode {ino.nid}: size {ino.size} too large for a directory or symlink")
        if ino.layout == L.LAYOUT_FLAT_PLAIN:
            return self._bytes(ino.i_u * BLOCK_SIZE, ino.size, f"data of inode {ino.nid}")
        if ino.layout != L.LAYOUT_FLAT_INLINE:
            raise self._fail(f"inode {ino.nid} has no flat data")
        tail = ino.size % BLOCK_SIZE
        full = ino.size - tail
        start = self._inline_offset(ino)
        if start % BLOCK_SIZE + tail > BLOCK_SIZE:
            raise self._fail(f"inode {ino.nid}: inline tail crosses a block boundary")
        head = self._bytes(ino.i_u * BLOCK_SIZE, full, f"data of inode {ino.nid}") if full else b""
        return head + self._bytes(start, tail, f"inline data of inode {ino.nid}")

    def readlink(self, ino: InodeInfo) -> bytes:
        """A symlink's target."""
        if not stat.S_ISLNK(ino.mode):
            raise self._fail(f"inode {ino.nid} is not a symlink")
        return self.flat_data(ino)

    def xattrs(self, ino: InodeInfo) -> dict[bytes, bytes]:
        """The inode's inline extended attributes."""
        if not ino.xattr_icount:
            return {}
        start = self.inode_offset(ino.nid) + ino.isize
        body = self._bytes(start, ino.xattr_size, f"xattrs of inode {ino.nid}")
        if body[4]:
            raise self._fail(f"inode {ino.nid} uses shared xattrs, which RAFS v6 does not support")
        out: dict[bytes, bytes] = {}
        pos = L.XATTR_IBODY_HEADER_SIZE
        while pos + L.XATTR_ENTRY.size <= len(body):
            name_len, index, value_size = L.XATTR_ENTRY.unpack_from(body, pos)
            end = pos + L.XATTR_ENTRY.size + name_len + value_size
            if index not in L.XATTR_PREFIXES or end > len(body):
                raise self._fail(f"inode {ino.nid} has a malformed xattr entry")
            name_start = pos + L.XATTR_ENTRY.size
            key = L.XATTR_PREFIXES[index] + body[name_start : name_start + name_len]
            out[key] = body[name_start + name_len : end]
            pos = L.align(end, 4)
        return out

    # -- directories ----------------------------------------------------------------------------

    def _dir_block(self, ino: InodeInfo, index: int) -> list[tuple[bytes, int, int]]:
        """Parse dirent block *index* of directory *ino* (the last one may be short)."""
        start = index * BLOCK_SIZE
        length = min(BLOCK_SIZE, ino.size - start)
        if ino.layout == L.LAYOUT_FLAT_INLINE and start + length == ino.size and ino.size % BLOCK_SIZE:
            inline = self._inline_offset(ino)
            if inline % BLOCK_SIZE + length > BLOCK_SIZE:
                raise self._fail(f"inode {ino.nid}: inline tail crosses a block boundary")
            block = self._bytes(inline, length, f"inline dirents of inode {ino.nid}")
        else:
            block = self._bytes(ino.i_u * BLOCK_SIZE + start, length, f"dirents of inode {ino.nid}")
        return self._parse_dir_block(ino, block)

    def _dir_block_count(self, ino: InodeInfo) -> int:
        if not ino.is_dir:
            raise self._fail(f"inode {ino.nid} is not a directory")
        if ino.layout not in (L.LAYOUT_FLAT_PLAIN, L.LAYOUT_FLAT_INLINE) or ino.size > MAX_DIR_SIZE:
            raise self._fail(f"directory {ino.nid} has an invalid layout or size")
        return -(-ino.size // BLOCK_SIZE)

    def _parse_dir_block(self, ino: InodeInfo, block: bytes) -> list[tuple[bytes, int, int]]:
        if len(block) < L.DIRENT_SIZE:
            raise self._fail(f"directory {ino.nid} has a truncated dirent block")
        first = L.DIRENT.unpack_from(block, 0)[1]
        if first % L.DIRENT_SIZE or not L.DIRENT_SIZE <= first < len(block):
            raise self._fail(f"directory {ino.nid}: bad first name offset {first}")
        count = first // L.DIRENT_SIZE
        ents = [L.DIRENT.unpack_from(block, i * L.DIRENT_SIZE) for i in range(count)]
        out = []
        for i, (nid, nameoff, ftype, _) in enumerate(ents):
            end = ents[i + 1][1] if i + 1 < count else len(block)
            if not first <= nameoff < end <= len(block):
                raise self._fail(f"directory {ino.nid}: dirent {i} has name bounds {nameoff}..{end}")
            name = block[nameoff:end]
            if i + 1 == count:
                name = name.rstrip(b"\0")
            out.append((name, nid, ftype))
        return out

    def readdir(self, ino: InodeInfo) -> Iterator[tuple[bytes, int, int]]:
        """``(name, nid, file type)`` for every entry, ``.`` and ``..`` included, in on-disk order."""
        for index in range(self._dir_block_count(ino)):
            yield from self._dir_block(ino, index)

    def lookup(self, ino: InodeInfo, name: bytes) -> int | None:
        """The nid of *name* in directory *ino* (directories are indexed once, LRU-cached)."""
        index = self._dirs.get(ino.nid)
        if index is None:
            index = {entry_name: nid for entry_name, nid, _ in self.readdir(ino)}
            self._dirs[ino.nid] = index
            if len(self._dirs) > DIR_CACHE_SIZE:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(ino.nid)
        return index.get(name)

    # -- chunks ---------------------------------------------------------------------------------

    @cached_property
    def chunk_table(self) -> dict[tuple[int, int], L.ChunkInfo]:
        """Chunk-table entries keyed by ``(blob_index, ci_index)``."""
        out = {}
        for i in range(self.sb.chunk_table_size // L.CHUNK_INFO_SIZE):
            c = L.ChunkInfo.unpack(self.buf, self.sb.chunk_table_offset + i * L.CHUNK_INFO_SIZE)
            if c.blob_index >= len(self.blobs):
                raise self._fail(f"chunk table entry {i} names blob {c.blob_index} of {len(self.blobs)}")
            out[(c.blob_index, c.index)] = c
        return out

    def blob_chunks(self, blob_index: int) -> list[ChunkRef]:
        """Every chunk of one blob listed in the chunk table, in compressed-offset order."""
        refs = [_chunk_ref(info) for (b, _), info in self.chunk_table.items() if b == blob_index]
        return sorted(refs, key=lambda r: r.compressed_offset)

    def chunk_addrs(self, ino: InodeInfo) -> list[tuple[int, int, int]]:
        """``(blob_index, ci_index, uncompressed block)`` of each chunk of a regular file."""
        if ino.layout != L.LAYOUT_CHUNK_BASED:
            raise self._fail(f"inode {ino.nid} is not chunk-based")
        count = -(-ino.size // self.sb.chunk_size)
        if count > 1 << 32:
            raise self._fail(f"inode {ino.nid}: size {ino.size} is impossibly large")
        start = L.align(self._inline_offset(ino), 8)
        raw = self._bytes(start, count * L.CHUNK_ADDR_SIZE, f"chunk indexes of inode {ino.nid}")
        out = []
        for i in range(count):
            lo, dev, blk = L.CHUNK_ADDR.unpack_from(raw, i * L.CHUNK_ADDR_SIZE)
            blob_index = (dev & 0xFF) - 1
            if not 0 <= blob_index < len(self.blobs):
                raise self._fail(f"inode {ino.nid} chunk {i} names blob {blob_index} of {len(self.blobs)}")
            out.append((blob_index, (dev >> 8) << 16 | lo, blk))
        return out

    def chunks(self, ino: InodeInfo) -> list[ChunkRef]:
        """The chunks backing a regular file, located through the bootstrap's chunk table."""
        refs = []
        table = self.chunk_table
        for k, (blob_index, ci, blk) in enumerate(self.chunk_addrs(ino)):
            info = table.get((blob_index, ci))
            if info is None:
                raise self._fail(f"inode {ino.nid} chunk {k}: ({blob_index}, {ci}) not in the chunk table")
            want = min(self.sb.chunk_size, ino.size - k * self.sb.chunk_size)
            if info.uncompressed_size != want or info.uncompressed_offset != blk * BLOCK_SIZE:
                raise self._fail(f"inode {ino.nid} chunk {k} disagrees with the chunk table entry")
            refs.append(_chunk_ref(info))
        return refs

    def prefetch_nids(self) -> list[int]:
        """The nids listed in the prefetch table (up to a 0 terminator)."""
        raw = self._bytes(self.sb.prefetch_table_offset, self.sb.prefetch_table_size, "prefetch table")
        nids = []
        for i in range(0, len(raw), 4):
            nid = int.from_bytes(raw[i : i + 4], "little")
            if nid == 0:
                break
            nids.append(nid)
        return nids

    # -- whole tree -----------------------------------------------------------------------------

    def to_tree(self) -> Tree:
        """Load every inode into a :class:`Tree` (hardlinks become shared inodes)."""
        tree = Tree(root=self._load_inode(self.inode(self.root_nid)), blobs=list(self.blobs),
                    chunk_size=self.sb.chunk_size)
        loaded: dict[int, Inode] = {self.root_nid: tree.root}
        paths: dict[int, bytes] = {self.root_nid: b"/"}
        stack = [self.root_nid]
        while stack:
            nid = stack.pop()
            parent = loaded[nid]
            for name, child_nid, _ in self.readdir(self.inode(nid)):
                if name in (b".", b".."):
                    continue
                self._check_name(nid, name)
                entries = parent.children()
                if name in entries:
                    raise self._fail(f"directory {nid} lists {name!r} twice")
                if child_nid in loaded:
                    child = loaded[child_nid]
                    if child.is_dir:
                        raise self._fail(f"directory loop or shared directory at nid {child_nid}")
                    entries[name] = child
                    continue
                child = self._load_inode(self.inode(child_nid))
                loaded[child_nid] = child
                entries[name] = child
                paths[child_nid] = paths[nid].rstrip(b"/") + b"/" + name
                if child.is_dir:
                    stack.append(child_nid)
        tree.prefetch = [paths[n] for n in self.prefetch_nids() if n in paths]
        return tree

    def _check_name(self, nid: int, name: bytes) -> None:
        try:
            check_name(name)
        except UnsafeEntryError as exc:
            raise self._fail(f"directory {nid}: {exc}") from None

    def _load_inode(self, ino: InodeInfo) -> Inode:
        node = Inode(mode=ino.mode, uid=ino.uid, gid=ino.gid, mtime=ino.mtime, mtime_nsec=ino.mtime_nsec,
                     rdev=ino.rdev, xattrs=self.xattrs(ino))
        if ino.is_dir:
            node.entries = {}
        elif stat.S_ISLNK(ino.mode):
            node.target = self.readlink(ino)
            node.size = len(node.target)
        elif stat.S_ISREG(ino.mode):
            node.size = ino.size
            node.chunks = self.chunks(ino)
        return node


def _chunk_ref(info: L.ChunkInfo) -> ChunkRef:
    """A chunk-table entry as a ChunkRef (stored sizes are equal for uncompressed chunks)."""
    csize = info.compressed_size if info.flags & L.CHUNK_COMPRESSED else info.uncompressed_size
    return ChunkRef(info.blob_index, info.index, info.digest, info.compressed_offset, csize,
                    info.uncompressed_offset, info.uncompressed_size)
