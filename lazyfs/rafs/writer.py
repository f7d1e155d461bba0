"""Lay a :class:`~lazyfs.rafs.tree.Tree` out as a RAFS v6 bootstrap (EROFS-compatible metadata).

Layout: superblocks, device slots, blob table, prefetch table, then the inode area starting at
``meta_blkaddr`` (root at nid 128, one block in, as nydus-image does), the full blocks of directories
and long symlinks, and finally the 80-byte chunk table. Every inode is extended (64 B).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass, field

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import BuildError
from lazyfs.rafs import layout as L
from lazyfs.rafs.tree import BLOCK_SIZE, BlobInfo, Inode, Tree

_DATA_TYPES = (stat.S_IFDIR, stat.S_IFLNK)
ROOT_OFFSET = BLOCK_SIZE  # root inode sits one block into the meta area: nid 128
MAX_BLOBS = 254


def file_type(mode: int) -> int:
    """The EROFS dirent file type for an st_mode."""
    fmt = stat.S_IFMT(mode)
    types = {
        stat.S_IFREG: L.FT_REG, stat.S_IFDIR: L.FT_DIR, stat.S_IFCHR: L.FT_CHR, stat.S_IFBLK: L.FT_BLK,
        stat.S_IFIFO: L.FT_FIFO, stat.S_IFSOCK: L.FT_SOCK, stat.S_IFLNK: L.FT_LNK,
    }
    if fmt not in types:
        raise BuildError(f"unsupported file type in mode {mode:o}")
    return types[fmt]


def encode_rdev(rdev: int) -> int:
    """Linux ``new_encode_dev``: the 32-bit device number the EROFS kernel driver decodes."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def pack_xattrs(xattrs: dict[bytes, bytes]) -> tuple[int, bytes]:
    """``(i_xattr_icount, inline xattr body)`` for a set of extended attributes."""
    if not xattrs:
        return 0, b""
    body = bytearray(L.XATTR_IBODY_HEADER_SIZE)
    for key in sorted(xattrs):
        value = xattrs[key]
        index, suffix = _xattr_prefix(key)
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise BuildError(f"xattr {key!r} name or value too long")
        entry = L.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        body += entry + b"\0" * (L.align(len(entry), 4) - len(entry))
    return (len(body) - L.XATTR_IBODY_HEADER_SIZE) // 4 + 1, bytes(body)


def _xattr_prefix(key: bytes) -> tuple[int, bytes]:
    best: tuple[int, bytes] | None = None
    for index, prefix in L.XATTR_PREFIXES.items():
        if key.startswith(prefix) and (best is None or len(prefix) > len(L.XATTR_PREFIXES[best[0]])):
            best = (index, key[len(prefix) :])
    if best is None:
        raise BuildError(f"xattr {key!r} has a namespace RAFS cannot store (user., trusted., security.)")
    return best


def dirent_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Split bytewise-sorted names into 4 KiB dirent blocks; no entry straddles two blocks."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = L.DIRENT_SIZE + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


@dataclass(eq=False)
class _Node:
    """Layout state of one inode while the bootstrap is being planned."""

    inode: Inode
    seq: int
    parent: Inode
    nlink: int = 1
    xattr_icount: int = 0
    xattr_body: bytes = b""
    size: int = 0
    dir_blocks: list[list[bytes]] = field(default_factory=list)
    layout: int = L.LAYOUT_FLAT_PLAIN
    nid: int = 0
    blkaddr: int = 0


class _Planner:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.nodes: list[_Node] = []
        self.by_id: dict[int, _Node] = {}
        if len(tree.blobs) > MAX_BLOBS:
            raise BuildError(f"{len(tree.blobs)} blobs: RAFS v6 allows at most {MAX_BLOBS}")
        self._collect()
        for node in self.nodes:
            self._shape(node)

    def _collect(self) -> None:
        queue: deque[tuple[Inode, Inode]] = deque([(self.tree.root, self.tree.root)])
        while queue:
            inode, parent = queue.popleft()
            known = self.by_id.get(id(inode))
            if known is not None:
                if inode.is_dir:
                    raise BuildError("a directory is linked twice in the tree")
                known.nlink += 1
                continue
            node = _Node(inode, len(self.nodes), parent)
            self.nodes.append(node)
            self.by_id[id(inode)] = node
            if inode.entries is not None:
                node.nlink = 2 + sum(1 for c in inode.entries.values() if c.is_dir)
                for name in sorted(inode.entries):
                    queue.append((inode.entries[name], inode))

    def _shape(self, node: _Node) -> None:
        inode = node.inode
        node.xattr_icount, node.xattr_body = pack_xattrs(inode.xattrs)
        fmt = stat.S_IFMT(inode.mode)
        if inode.entries is not None:
            names = sorted([b".", b"..", *inode.entries])
            node.dir_blocks = dirent_blocks(names)
            last = node.dir_blocks[-1]
            node.size = BLOCK_SIZE * (len(node.dir_blocks) - 1) + sum(L.DIRENT_SIZE + len(n) for n in last)
            self._choose_layout(node)
        elif fmt == stat.S_IFLNK:
            if not inode.target or len(inode.target) > BLOCK_SIZE:
                raise BuildError(f"symlink target of {len(inode.target)} bytes is not storable")
            node.size = len(inode.target)
            self._choose_layout(node)
        elif fmt == stat.S_IFREG:
            node.size = inode.size
            node.layout = L.LAYOUT_CHUNK_BASED
            expected = -(-inode.size // self.tree.chunk_size)
            if len(inode.chunks) != expected:
                raise BuildError(f"file of {inode.size} bytes has {len(inode.chunks)} chunks, not {expected}")
        else:
            file_type(inode.mode)

    @staticmethod
    def _choose_layout(node: _Node) -> None:
        """Tail-pack directory and symlink data after the inode when the tail fits in its block."""
        tail = node.size % BLOCK_SIZE
        meta = L.EXTENDED_INODE_SIZE + len(node.xattr_body)
        node.layout = L.LAYOUT_FLAT_INLINE if tail and meta + tail <= BLOCK_SIZE else L.LAYOUT_FLAT_PLAIN

    def record_size(self, node: _Node) -> int:
        """Bytes the inode occupies in the meta area (inode, xattrs, then indexes or inline tail)."""
        base = L.EXTENDED_INODE_SIZE + len(node.xattr_body)
        if node.layout == L.LAYOUT_CHUNK_BASED:
            return L.align(base, 8) + L.CHUNK_ADDR_SIZE * len(node.inode.chunks)
        return base + (node.size % BLOCK_SIZE if node.layout == L.LAYOUT_FLAT_INLINE else 0)

    def data_blocks(self, node: _Node) -> int:
        """Number of whole blocks the inode's data needs outside the meta area."""
        if node.layout == L.LAYOUT_CHUNK_BASED or stat.S_IFMT(node.inode.mode) not in _DATA_TYPES:
            return 0
        return node.size // BLOCK_SIZE if node.layout == L.LAYOUT_FLAT_INLINE else -(-node.size // BLOCK_SIZE)

    def assign_nids(self) -> int:
        """Give every inode a nid; return the meta area's size in bytes."""
        cursor = ROOT_OFFSET
        for node in self.nodes:
            size = self.record_size(node)
            if cursor % BLOCK_SIZE + size > BLOCK_SIZE:
                cursor = L.align(cursor, BLOCK_SIZE)
            node.nid = cursor // L.INODE_SLOT
            cursor += L.align(size, L.INODE_SLOT)
        if self.nodes[0].nid >= 1 << 16:
            raise BuildError("root nid does not fit in 16 bits")
        return L.align(cursor, BLOCK_SIZE)

    def assign_blocks(self, first_block: int) -> int:
        """Give directories and symlinks their data blocks; return the first free block."""
        block = first_block
        for node in self.nodes:
            count = self.data_blocks(node)
            if count:
                node.blkaddr = block
                block += count
        return block

    def dir_data(self, node: _Node) -> bytes:
        """The dirent area of a directory, with nids resolved."""
        entries = node.inode.children()
        out = bytearray()
        for i, names in enumerate(node.dir_blocks):
            block = bytearray()
            nameoff = L.DIRENT_SIZE * len(names)
            for name in names:
                if name == b".":
                    target = node
                elif name == b"..":
                    target = self.by_id[id(node.parent)]
                else:
                    target = self.by_id[id(entries[name])]
                block += L.DIRENT.pack(target.nid, nameoff, file_type(target.inode.mode), 0)
                nameoff += len(name)
            block += b"".join(names)
            if i < len(node.dir_blocks) - 1:
                block += b"\0" * (BLOCK_SIZE - len(block))
            out += block
        return bytes(out)

    def inode_bytes(self, node: _Node) -> tuple[bytes, bytes]:
        """The record stored at the inode's nid, and its data blocks (if any)."""
        inode = node.inode
        data = b""
        if node.inode.entries is not None:
            data = self.dir_data(node)
        elif stat.S_IFMT(inode.mode) == stat.S_IFLNK:
            data = inode.target
        inline = len(data) % BLOCK_SIZE if node.layout == L.LAYOUT_FLAT_INLINE else 0
        blocks, tail = data[: len(data) - inline], data[len(data) - inline :] if inline else b""
        if node.layout == L.LAYOUT_CHUNK_BASED:
            i_u = L.CHUNK_FORMAT_INDEXES | (self.tree.chunk_size.bit_length() - 1 - 12)
        elif stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            i_u = encode_rdev(inode.rdev)
        else:
            i_u = node.blkaddr
        head = L.EXTENDED_INODE.pack(
            1 | (node.layout << 1), node.xattr_icount, inode.mode & 0xFFFF, 0, node.size, i_u, node.seq,
            inode.uid, inode.gid, inode.mtime, inode.mtime_nsec, node.nlink, b"",
        ) + node.xattr_body
        if node.layout == L.LAYOUT_CHUNK_BASED:
            head += b"\0" * (L.align(len(head), 8) - len(head))
            head += b"".join(_chunk_addr(c.blob_index, c.index, c.uncompressed_offset) for c in inode.chunks)
        else:
            head += tail
        if blocks:
            blocks += b"\0" * (L.align(len(blocks), BLOCK_SIZE) - len(blocks))
        return head, blocks


def _chunk_addr(blob_index: int, ci_index: int, uncompressed_offset: int) -> bytes:
    if not 0 <= blob_index < MAX_BLOBS or ci_index >= 1 << 24:
        raise BuildError(f"chunk address out of range: blob {blob_index}, index {ci_index}")
    return L.CHUNK_ADDR.pack(
        ci_index & 0xFFFF, (blob_index + 1) | ((ci_index >> 16) << 8), uncompressed_offset // BLOCK_SIZE
    )


def _chunk_table(tree: Tree, nodes: list[_Node]) -> bytes:
    seen: dict[tuple[int, int], L.ChunkInfo] = {}
    for node in nodes:
        for c in node.inode.chunks:
            if (c.blob_index, c.index) not in seen:
                seen[(c.blob_index, c.index)] = L.ChunkInfo(
                    c.digest, c.blob_index, L.CHUNK_COMPRESSED if c.compressed else 0, c.compressed_size,
                    c.uncompressed_size, c.compressed_offset, c.uncompressed_offset, 0, c.index,
                )
    entries = sorted(seen.values(), key=lambda e: (e.digest, e.blob_index))
    return b"".join(e.pack() for e in entries)


def _prefetch_nids(tree: Tree, planner: _Planner) -> list[int]:
    nids = []
    for path in tree.prefetch:
        inode = tree.lookup(path)
        if inode is None:
            raise BuildError(f"prefetch path {path!r} is not in the image")
        nids.append(planner.by_id[id(inode)])
    return [n.nid for n in nids]


def _super_flags(tree: Tree, has_xattr: bool) -> int:
    compressor = tree.blobs[0].compressor if tree.blobs else Compressor.ZSTD
    digester = tree.blobs[0].digester if tree.blobs else Digester.BLAKE3
    flags = L.COMPRESSION_FLAGS[compressor] | L.DIGEST_FLAGS[digester] | L.FLAG_EXPLICIT_UID_GID
    if has_xattr:
        flags |= L.FLAG_HAS_XATTR
    if tree.blobs and all(b.features & L.BLOB_INLINED_CHUNK_DIGEST for b in tree.blobs):
        flags |= L.FLAG_INLINED_CHUNK_DIGEST
    return flags


def write_bootstrap(tree: Tree) -> bytes:
    """Serialise *tree* (with its blobs) as a RAFS v6 bootstrap."""
    for blob in tree.blobs:
        if blob.chunk_size != tree.chunk_size:
            raise BuildError(f"blob {blob.blob_id} chunk size {blob.chunk_size} != {tree.chunk_size}")
    planner = _Planner(tree)
    nblobs = len(tree.blobs)
    blob_table_offset = L.align(L.DEVSLOT_OFFSET + nblobs * L.DEVSLOT_SIZE, BLOCK_SIZE)
    prefetch_offset = blob_table_offset + nblobs * L.BLOB_ENTRY_SIZE
    prefetch_size = 4 * len(tree.prefetch)
    meta_blkaddr = L.align(prefetch_offset + prefetch_size, BLOCK_SIZE) // BLOCK_SIZE
    meta_size = planner.assign_nids()
    data_end = planner.assign_blocks(meta_blkaddr + meta_size // BLOCK_SIZE)
    chunk_table = _chunk_table(tree, planner.nodes)
    chunk_table_offset = data_end * BLOCK_SIZE
    total = L.align(chunk_table_offset + len(chunk_table), BLOCK_SIZE)

    out = bytearray(total)
    meta_base = meta_blkaddr * BLOCK_SIZE
    for node in planner.nodes:
        head, blocks = planner.inode_bytes(node)
        start = meta_base + node.nid * L.INODE_SLOT
        out[start : start + len(head)] = head
        if blocks:
            out[node.blkaddr * BLOCK_SIZE : node.blkaddr * BLOCK_SIZE + len(blocks)] = blocks
    out[chunk_table_offset : chunk_table_offset + len(chunk_table)] = chunk_table
    prefetch = b"".join(n.to_bytes(4, "little") for n in _prefetch_nids(tree, planner))
    out[prefetch_offset : prefetch_offset + len(prefetch)] = prefetch

    mapped = L.align(total, L.BLOB_SEGMENT_ALIGN) // BLOCK_SIZE
    for i, blob in enumerate(tree.blobs):
        nblocks = blob.uncompressed_size // BLOCK_SIZE
        slot = L.DEVSLOT_OFFSET + i * L.DEVSLOT_SIZE
        out[slot : slot + L.DEVSLOT_SIZE] = L.DEVSLOT.pack(blob.blob_id.encode(), nblocks, mapped, b"")
        mapped += L.align(nblocks * BLOCK_SIZE, L.BLOB_SEGMENT_ALIGN) // BLOCK_SIZE
        entry = blob_table_offset + i * L.BLOB_ENTRY_SIZE
        out[entry : entry + L.BLOB_ENTRY_SIZE] = _blob_entry(i, blob).pack()
    sb = L.SuperBlock(
        root_nid=planner.nodes[0].nid, inos=len(planner.nodes),
        blocks=sum(b.uncompressed_size // BLOCK_SIZE for b in tree.blobs), meta_blkaddr=meta_blkaddr,
        extra_devices=nblobs, flags=_super_flags(tree, any(n.xattr_icount for n in planner.nodes)),
        blob_table_offset=blob_table_offset, blob_table_size=nblobs * L.BLOB_ENTRY_SIZE,
        chunk_size=tree.chunk_size, chunk_table_offset=chunk_table_offset,
        chunk_table_size=len(chunk_table), prefetch_table_offset=prefetch_offset if prefetch else 0,
        prefetch_table_size=len(prefetch),
    )
    packed = sb.pack()
    out[L.SUPER_OFFSET : L.SUPER_OFFSET + len(packed)] = packed
    return bytes(out)


def _blob_entry(index: int, blob: BlobInfo) -> L.BlobEntry:
    if len(blob.blob_id) != 64:
        raise BuildError(f"blob id {blob.blob_id!r} is not 64 characters")
    toc = blob.toc
    return L.BlobEntry(
        blob_id=blob.blob_id.encode(), blob_index=index, chunk_size=blob.chunk_size,
        chunk_count=blob.chunk_count, compressor=blob.compressor, digester=blob.digester,
        features=blob.features, compressed_size=blob.compressed_size,
        uncompressed_size=blob.uncompressed_size, toc_size=toc.size if toc else 0,
        ci_compressor=blob.ci_compressor, ci_offset=blob.ci_offset,
        ci_compressed_size=blob.ci_compressed_size, ci_uncompressed_size=blob.ci_uncompressed_size,
        toc_digest=toc.digest if toc else b"",
    )
