"""RAFS v6 on-disk constants and fixed-size records (all little-endian).

Field layouts follow ../shared/docs/nydus-format.md §1; every record has a ``pack`` and an ``unpack``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from typing_extensions import Buffer

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import FormatError

EROFS_MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
EXT_SUPER_OFFSET = 1152
DEVSLOT_OFFSET = 1408
DEVSLOT_SIZE = 128
BLOB_ENTRY_SIZE = 256
CHUNK_INFO_SIZE = 80
DIRENT_SIZE = 12
CHUNK_ADDR_SIZE = 8
INODE_SLOT = 32
COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64
BLOB_SEGMENT_ALIGN = 0x80000
NULL_ADDR = 0xFFFFFFFF

FEATURE_COMPAT_RAFS_V6 = 0x40000000
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
RAFS_V6_INCOMPAT = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE

# i_format data layouts (bits 1-3)
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
CHUNK_FORMAT_INDEXES = 0x20

# RafsSuperFlags
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200

COMPRESSION_FLAGS = {
    Compressor.NONE: FLAG_COMPRESSION_NONE, Compressor.LZ4_BLOCK: FLAG_COMPRESSION_LZ4,
    Compressor.GZIP: FLAG_COMPRESSION_GZIP, Compressor.ZSTD: FLAG_COMPRESSION_ZSTD,
}
DIGEST_FLAGS = {Digester.BLAKE3: FLAG_HASH_BLAKE3, Digester.SHA256: FLAG_HASH_SHA256}


def algorithms_from_flags(flags: int) -> tuple[Compressor, Digester]:
    """The compressor and digester named by RafsSuperFlags; exactly one of each must be set."""
    compressors = [c for c, bit in COMPRESSION_FLAGS.items() if flags & bit]
    digesters = [d for d, bit in DIGEST_FLAGS.items() if flags & bit]
    if len(compressors) != 1:
        raise FormatError(f"superblock flags {flags:#x} must name exactly one compression algorithm")
    if len(digesters) != 1:
        raise FormatError(f"superblock flags {flags:#x} must name exactly one digest algorithm")
    return compressors[0], digesters[0]


# BlobFeatures
BLOB_ALIGNED = 0x1
BLOB_INLINED_FS_META = 0x2
BLOB_CHUNK_INFO_V2 = 0x4
BLOB_ZRAN = 0x8
BLOB_SEPARATE = 0x10
BLOB_INLINED_CHUNK_DIGEST = 0x20
BLOB_TARFS = 0x40
BLOB_BATCH = 0x80
BLOB_ENCRYPTED = 0x100
BLOB_HAS_TAR_HEADER = 0x10000000
BLOB_HAS_TOC = 0x20000000
BLOB_CAP_TAR_TOC = 0x40000000

# Chunk table flags
CHUNK_COMPRESSED = 0x1
CHUNK_HOLE = 0x2
CHUNK_ENCRYPTED = 0x4
CHUNK_BATCH = 0x8

# Directory entry file types
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = range(8)

# Xattr name indexes
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}


def align(value: int, to: int) -> int:
    """Round *value* up to a multiple of *to*."""
    return (value + to - 1) // to * to


_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH38s")
_EXT_SUPER = struct.Struct("<QQIIQQQII200s")


@dataclass(slots=True)
class SuperBlock:
    """The EROFS superblock at 1024 plus the RAFS v6 extended superblock at 1152."""

    root_nid: int
    inos: int
    blocks: int
    meta_blkaddr: int
    extra_devices: int
    flags: int
    blob_table_offset: int
    blob_table_size: int
    chunk_size: int
    chunk_table_offset: int
    chunk_table_size: int
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0
    blkszbits: int = 12
    feature_compat: int = FEATURE_COMPAT_RAFS_V6
    feature_incompat: int = RAFS_V6_INCOMPAT
    devt_slotoff: int = DEVSLOT_OFFSET // DEVSLOT_SIZE
    xattr_blkaddr: int = 0

    def pack(self) -> bytes:
        """The 128-byte superblock followed by the 256-byte extended superblock."""
        sb = _SUPER.pack(
            EROFS_MAGIC, 0, self.feature_compat, self.blkszbits, 0, self.root_nid, self.inos, 0, 0,
            self.blocks, self.meta_blkaddr, self.xattr_blkaddr, b"", b"", self.feature_incompat, 0,
            self.extra_devices, self.devt_slotoff, b"",
        )
        ext = _EXT_SUPER.pack(
            self.flags, self.blob_table_offset, self.blob_table_size, self.chunk_size,
            self.chunk_table_offset, self.chunk_table_size, self.prefetch_table_offset,
            self.prefetch_table_size, 0, b"",
        )
        return sb + ext

    @classmethod
    def unpack(cls, data: bytes) -> SuperBlock:
        """Parse both superblocks from a bootstrap's first 1408 bytes (no semantic checks)."""
        if len(data) < DEVSLOT_OFFSET:
            raise FormatError(f"bootstrap truncated: {len(data)} bytes, superblock needs {DEVSLOT_OFFSET}")
        f = _SUPER.unpack_from(data, SUPER_OFFSET)
        if f[0] != EROFS_MAGIC:
            raise FormatError(f"bad EROFS magic {f[0]:#010x} at offset 1024 (not a RAFS v6 bootstrap)")
        e = _EXT_SUPER.unpack_from(data, EXT_SUPER_OFFSET)
        return cls(
            root_nid=f[5], inos=f[6], blocks=f[9], meta_blkaddr=f[10], extra_devices=f[16],
            flags=e[0], blob_table_offset=e[1], blob_table_size=e[2], chunk_size=e[3],
            chunk_table_offset=e[4], chunk_table_size=e[5], prefetch_table_offset=e[6],
            prefetch_table_size=e[7], blkszbits=f[3], feature_compat=f[2], feature_incompat=f[14],
            devt_slotoff=f[17], xattr_blkaddr=f[11],
        )


_BLOB_ENTRY = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQQI36s")


@dataclass(slots=True)
class BlobEntry:
    """One 256-byte RafsV6Blob record of the blob table."""

    blob_id: bytes
    blob_index: int
    chunk_size: int
    chunk_count: int
    compressor: int
    digester: int
    features: int
    compressed_size: int
    uncompressed_size: int
    toc_size: int
    ci_compressor: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    toc_digest: bytes
    meta_digest: bytes = b""
    meta_size: int = 0

    def pack(self) -> bytes:
        """Serialise to 256 bytes."""
        return _BLOB_ENTRY.pack(
            self.blob_id, self.blob_index, self.chunk_size, self.chunk_count, self.compressor,
            self.digester, self.features, self.compressed_size, self.uncompressed_size, self.toc_size,
            self.ci_compressor, self.ci_offset, self.ci_compressed_size, self.ci_uncompressed_size,
            self.toc_digest, self.meta_digest, self.meta_size, 0, 0, b"",
        )

    @classmethod
    def unpack(cls, data: Buffer, offset: int) -> BlobEntry:
        """Parse one entry at *offset*."""
        f = _BLOB_ENTRY.unpack_from(data, offset)
        return cls(*f[:17])


_CHUNK_INFO = struct.Struct("<32sIIIIQQQII")


@dataclass(slots=True)
class ChunkInfo:
    """One 80-byte chunk-table entry (RafsV5ChunkInfo, also used by v6 bootstraps)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int = 0

    def pack(self) -> bytes:
        """Serialise to 80 bytes."""
        return _CHUNK_INFO.pack(
            self.digest, self.blob_index, self.flags, self.compressed_size, self.uncompressed_size,
            self.compressed_offset, self.uncompressed_offset, self.file_offset, self.index, self.crc32,
        )

    @classmethod
    def unpack(cls, data: Buffer, offset: int) -> ChunkInfo:
        """Parse one entry at *offset*."""
        return cls(*_CHUNK_INFO.unpack_from(data, offset))


EXTENDED_INODE = struct.Struct("<HHHHQIIIIQII16s")
COMPACT_INODE = struct.Struct("<HHHHIIIIHHI")
DIRENT = struct.Struct("<QHBB")
CHUNK_ADDR = struct.Struct("<HHI")
DEVSLOT = struct.Struct("<64sII56s")
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_IBODY_HEADER_SIZE = 12


def xattr_ibody_size(icount: int) -> int:
    """Bytes of inline xattrs for ``i_xattr_icount`` (0 means none)."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER_SIZE + 4 * (icount - 1)
