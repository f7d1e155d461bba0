"""Nydus data blobs: writing them chunk by chunk and reading their "reverse tar" TOC trailer.

Layout written (nydus-image ``--features blob-toc``)::

    chunk data | hdr image.blob | ci array | ci header | hdr blob.meta
    | digests | hdr blob.digest | TOC entries | hdr rafs.blob.toc

Each tar header follows its data; readers walk backwards from the end of the file.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from lazyfs.chunks.codec import Compressor, compress, decompress
from lazyfs.chunks.digest import Digester, digest, verify
from lazyfs.errors import BuildError, FormatError
from lazyfs.rafs import blobmeta, layout
from lazyfs.rafs.tree import BLOCK_SIZE, BlobInfo, ChunkRef, TocInfo

TAR_BLOCK = 512
TOC_ENTRY_SIZE = 128
MAX_TOC_SIZE = 64 * 1024
TOC_NAME = b"rafs.blob.toc"
TOC_FLAG_NONE, TOC_FLAG_ZSTD, TOC_FLAG_LZ4 = 1, 2, 4
BLOB_FEATURES = (
    layout.BLOB_ALIGNED | layout.BLOB_INLINED_CHUNK_DIGEST | layout.BLOB_HAS_TAR_HEADER
    | layout.BLOB_HAS_TOC | layout.BLOB_CAP_TAR_TOC
)
_TOC_ENTRY = struct.Struct("<II16s32sQQQ48s")


def tar_header(name: bytes, size: int) -> bytes:
    """A 512-byte GNU tar header like nydus-image writes (mode, ids and mtime zero)."""
    hdr = bytearray(TAR_BLOCK)
    hdr[0 : len(name)] = name
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar  \0"
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%07o\0" % sum(hdr)
    return bytes(hdr)


def parse_tar_header(hdr: bytes) -> tuple[bytes, int]:
    """Name and size from a 512-byte header, checking its checksum."""
    if len(hdr) != TAR_BLOCK:
        raise FormatError("blob truncated inside a tar header")
    try:
        stored = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
        size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise FormatError("blob tar header has non-octal fields") from None
    if stored != sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]):
        raise FormatError("blob tar header checksum mismatch")
    return hdr[:100].rstrip(b"\0"), size


@dataclass(frozen=True, slots=True)
class TocEntry:
    """One 128-byte entry of a blob's ``rafs.blob.toc``."""

    flags: int
    name: bytes
    digest: bytes  # sha256 of the uncompressed content
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    def pack(self) -> bytes:
        """Serialise to 128 bytes."""
        return _TOC_ENTRY.pack(
            self.flags, 0, self.name, self.digest, self.compressed_offset, self.compressed_size,
            self.uncompressed_size, b"",
        )


class _HashingWriter:
    """Writes to a file while tracking offset and sha256."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.offset = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.sha256.update(data)
        self.offset += len(data)


class BlobWriter:
    """Streams file data into a data blob, deduplicating chunks by digest.

    Call :meth:`add_file` for every regular file, then :meth:`finish` once. The blob id is the
    sha256 of the finished file, which is what an OCI layer digest of the blob will be.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        compressor: Compressor = Compressor.ZSTD,
        digester: Digester = Digester.BLAKE3,
        chunk_size: int = 0x100000,
        blob_index: int = 0,
    ) -> None:
        if chunk_size & (chunk_size - 1) or not 0x1000 <= chunk_size <= 0x1000000:
            raise BuildError(f"chunk size {chunk_size:#x} must be a power of two in 4 KiB..16 MiB")
        self._w = _HashingWriter(out)
        self.compressor = compressor
        self.digester = digester
        self.chunk_size = chunk_size
        self.blob_index = blob_index
        self._chunks: list[ChunkRef] = []
        self._by_digest: dict[bytes, ChunkRef] = {}
        self._uncompressed_end = 0
        self._zero_chunks: dict[int, ChunkRef] = {}

    def add_chunk(self, data: bytes) -> ChunkRef:
        """Store one chunk (or reuse an identical one) and return where it lives."""
        key = digest(self.digester, data)
        found = self._by_digest.get(key)
        if found is not None:
            return found
        packed = compress(self.compressor, data)
        if len(packed) >= len(data):
            packed = data
        ref = ChunkRef(
            blob_index=self.blob_index, index=len(self._chunks), digest=key,
            compressed_offset=self._w.offset, compressed_size=len(packed),
            uncompressed_offset=self._uncompressed_end, uncompressed_size=len(data),
        )
        self._w.write(packed)
        self._uncompressed_end += layout.align(len(data), BLOCK_SIZE)
        self._chunks.append(ref)
        self._by_digest[key] = ref
        return ref

    def add_zero_chunk(self, size: int) -> ChunkRef:
        """A chunk of *size* zero bytes (a hole of a sparse file), hashed once per size."""
        ref = self._zero_chunks.get(size)
        if ref is None:
            ref = self._zero_chunks[size] = self.add_chunk(bytes(size))
        return ref

    def add_file(self, src: BinaryIO, size: int) -> list[ChunkRef]:
        """Read exactly *size* bytes from *src* chunk by chunk; return the file's chunk list."""
        refs = []
        remaining = size
        while remaining:
            want = min(self.chunk_size, remaining)
            data = src.read(want)
            while len(data) < want:
                more = src.read(want - len(data))
                if not more:
                    raise BuildError(f"file data ended {remaining - len(data)} bytes early")
                data += more
            refs.append(self.add_chunk(data))
            remaining -= want
        return refs

    def _section(self, name: bytes, data: bytes) -> TocEntry:
        start = self._w.offset
        self._w.write(data)
        self._w.write(tar_header(name, len(data)))
        return TocEntry(TOC_FLAG_NONE, name, hashlib.sha256(data).digest(), start, len(data), len(data))

    def finish(self) -> BlobInfo:
        """Write blob meta, digests and TOC; return the blob's table entry."""
        data_end = self._w.offset
        self._w.write(tar_header(b"image.blob", data_end))
        ci = b"".join(blobmeta.encode_v1(_meta(c)) for c in self._chunks)
        ci_packed = compress(self.compressor, ci) if ci else b""
        ci_compressor = self.compressor if 0 < len(ci_packed) < len(ci) else Compressor.NONE
        if ci_compressor is Compressor.NONE:
            ci_packed = ci
        ci_offset = self._w.offset
        header = blobmeta.MetaHeader(
            features=BLOB_FEATURES, ci_compressor=ci_compressor, ci_entries=len(self._chunks),
            ci_offset=ci_offset, ci_compressed_size=len(ci_packed), ci_uncompressed_size=len(ci),
        ).pack()
        meta = self._section(b"blob.meta", ci_packed + header)
        digests = self._section(b"blob.digest", b"".join(c.digest for c in self._chunks))
        image = TocEntry(TOC_FLAG_NONE, b"image.blob", b"\0" * 32, 0, data_end, data_end)
        toc_body = b"".join(e.pack() for e in (image, meta, digests))
        toc_hdr = tar_header(TOC_NAME, len(toc_body))
        self._w.write(toc_body)
        self._w.write(toc_hdr)
        return BlobInfo(
            blob_id=self._w.sha256.hexdigest(), chunk_count=len(self._chunks), chunk_size=self.chunk_size,
            compressor=self.compressor, digester=self.digester, features=BLOB_FEATURES,
            compressed_size=self._w.offset, uncompressed_size=self._uncompressed_end,
            ci_compressor=ci_compressor, ci_offset=ci_offset, ci_compressed_size=len(ci_packed),
            ci_uncompressed_size=len(ci),
            toc=TocInfo(hashlib.sha256(toc_body + toc_hdr).digest(), len(toc_body) + TAR_BLOCK),
        )


def _meta(c: ChunkRef) -> blobmeta.ChunkMeta:
    return blobmeta.ChunkMeta(
        c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size, c.compressed
    )


def read_at(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    """Exactly *size* bytes at *offset*, or a FormatError naming *what*."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise FormatError(f"{what}: wanted {size} bytes at offset {offset}, file ends after {len(data)}")
    return data


def walk_sections(f: BinaryIO, size: int) -> Iterator[tuple[bytes, int, int]]:
    """Yield (name, data offset, data size) of each reverse-tar section, last first."""
    cur = size - TAR_BLOCK
    while cur >= 0:
        name, length = parse_tar_header(read_at(f, cur, TAR_BLOCK, "blob tar header"))
        if length > cur:
            raise FormatError(f"blob section {name!r} claims {length} bytes, only {cur} precede it")
        yield name, cur - length, length
        cur -= length + TAR_BLOCK


def read_toc(f: BinaryIO, size: int) -> list[TocEntry]:
    """The TOC entries of a data blob of *size* bytes."""
    if size < TAR_BLOCK:
        raise FormatError(f"blob of {size} bytes is too small to hold a TOC")
    name, length = parse_tar_header(read_at(f, size - TAR_BLOCK, TAR_BLOCK, "blob TOC header"))
    if name != TOC_NAME:
        raise FormatError(f"blob has no TOC: last tar entry is {name!r}")
    if length % TOC_ENTRY_SIZE or length > MAX_TOC_SIZE or length + TAR_BLOCK > size:
        raise FormatError(f"blob TOC size {length} is invalid")
    body = read_at(f, size - TAR_BLOCK - length, length, "blob TOC")
    entries = []
    for off in range(0, length, TOC_ENTRY_SIZE):
        flags, _, nm, dg, coff, csize, usize, _ = _TOC_ENTRY.unpack_from(body, off)
        entries.append(TocEntry(flags, nm.rstrip(b"\0"), dg, coff, csize, usize))
    return entries


MAX_BOOTSTRAP = 1 << 30


def read_toc_entry(f: BinaryIO, entry: TocEntry) -> bytes:
    """The uncompressed, sha256-verified content of one TOC entry."""
    if entry.uncompressed_size > MAX_BOOTSTRAP:
        raise FormatError(f"TOC entry {entry.name!r} is too large ({entry.uncompressed_size} bytes)")
    raw = read_at(f, entry.compressed_offset, entry.compressed_size, f"TOC entry {entry.name!r}")
    if entry.flags & TOC_FLAG_ZSTD:
        raw = decompress(Compressor.ZSTD, raw, entry.uncompressed_size)
    elif entry.flags & TOC_FLAG_LZ4:
        raise FormatError(f"TOC entry {entry.name!r} is lz4-compressed, which nydus does not extract either")
    if hashlib.sha256(raw).digest() != entry.digest and entry.name != b"image.blob":
        raise FormatError(f"TOC entry {entry.name!r} fails its sha256 check")
    return raw


def extract_bootstrap(f: BinaryIO, size: int) -> bytes:
    """The bootstrap inlined in a data blob (``image.boot``), found through the TOC or tar walk."""
    try:
        for entry in read_toc(f, size):
            if entry.name == b"image.boot":
                return read_toc_entry(f, entry)
    except FormatError:
        pass
    for name, offset, length in walk_sections(f, size):
        if name == b"image.boot":
            if length > MAX_BOOTSTRAP:
                raise FormatError(f"inlined bootstrap is too large ({length} bytes)")
            return read_at(f, offset, length, "inlined bootstrap")
    raise FormatError("blob has no inlined bootstrap (image.boot)")


def read_chunk(f: BinaryIO, blob: BlobInfo, ref: ChunkRef, what: str = "") -> bytes:
    """Read, decompress and verify one chunk from a local data blob file."""
    name = what or f"blob {blob.blob_id[:12]} chunk {ref.index}"
    raw = read_at(f, ref.compressed_offset, ref.compressed_size, name)
    data = decompress(blob.compressor, raw, ref.uncompressed_size) if ref.compressed else raw
    verify(blob.digester, data, ref.digest, name)
    return data
