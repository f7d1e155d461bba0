"""Hostile bootstraps and blobs: clear FormatErrors, never crashes, hangs or wrong bytes."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.chunks.codec import Compressor
from lazyfs.errors import DigestMismatch, FormatError
from lazyfs.rafs import layout as L
from lazyfs.rafs.blob import BlobWriter, read_chunk
from lazyfs.rafs.reader import Bootstrap
from lazyfs.rafs.tree import Inode, Tree
from lazyfs.rafs.writer import write_bootstrap
from tests.test_rafs_fixtures import V6_BOOT


def _sample() -> tuple[bytes, bytes, Tree]:
    """A small bootstrap with a subdirectory, files and a symlink, plus its blob."""
    out = io.BytesIO()
    writer = BlobWriter(out, compressor=Compressor.NONE, chunk_size=0x1000)
    tree = Tree(chunk_size=0x1000)
    root = tree.root.children()
    sub = Inode.directory()
    root[b"sub"] = sub
    for name, data in ((b"aaa", b"x" * 5000), (b"aab", b"y" * 10)):
        sub.children()[name] = Inode(mode=0o100644, size=len(data), chunks=writer.add_file(io.BytesIO(data), len(data)))
    root[b"link"] = Inode(mode=0o120777, target=b"sub/aaa", size=7)
    tree.blobs = [writer.finish()]
    return write_bootstrap(tree), out.getvalue(), tree


def _read_all(data: bytes) -> None:
    boot = Bootstrap(data)
    tree = boot.to_tree()
    boot.prefetch_nids()
    for _, node in tree.walk():
        assert node.size >= 0


def _dirent_offsets(data: bytes, dir_path: bytes) -> tuple[int, list[tuple[bytes, int]]]:
    """Byte offset of the dirent area of *dir_path*, and (name, dirent offset) pairs."""
    boot = Bootstrap(data)
    ino = boot.inode(boot.root_nid)
    for part in [p for p in dir_path.split(b"/") if p]:
        nid = boot.lookup(ino, part)
        assert nid is not None
        ino = boot.inode(nid)
    assert ino.layout == L.LAYOUT_FLAT_INLINE
    start = boot.inode_offset(ino.nid) + ino.isize + ino.xattr_size
    names = [(name, start + i * L.DIRENT_SIZE) for i, (name, _, _) in enumerate(boot.readdir(ino))]
    return start, names


@pytest.mark.parametrize("cut", [0, 100, 1024, 1100, 1400, 4096, 4200, 8192, 12000])
def test_truncated_bootstrap(cut: int) -> None:
    data = V6_BOOT.read_bytes()[:cut]
    with pytest.raises(FormatError, match=r"truncated|outside|magic|not a Nydus|past the end"):
        _read_all(data)


def test_bad_magic() -> None:
    data = bytearray(V6_BOOT.read_bytes())
    data[1024:1028] = b"\xde\xad\xbe\xef"
    with pytest.raises(FormatError, match="not a Nydus bootstrap"):
        Bootstrap(bytes(data))


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (1064, "<I", 0xFFFFFF, "meta_blkaddr"),
        (1176, "<Q", 1 << 40, "chunk table"),
        (1160, "<Q", 1 << 40, "blob table"),
        (1168, "<I", 100, "blob table size"),
        (1172, "<I", 12345, "chunk size"),
        (1152, "<Q", 0x3 | 0x4, "exactly one compression"),
        (1104, "<I", 0x1C, "incompat"),
        (1036, "<B", 13, "block size"),
    ],
)
def test_out_of_range_superblock_fields(offset: int, fmt: str, value: int, message: str) -> None:
    data = bytearray(V6_BOOT.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(FormatError, match=message):
        _read_all(bytes(data))


def test_dirent_loop_is_reported() -> None:
    data, _, _ = _sample()
    boot = Bootstrap(data)
    _, names = _dirent_offsets(data, b"/sub")
    buf = bytearray(data)
    aaa = dict(names)[b"aaa"]
    struct.pack_into("<Q", buf, aaa, boot.root_nid)  # sub/aaa -> root directory
    struct.pack_into("<B", buf, aaa + 10, L.FT_DIR)
    with pytest.raises(FormatError, match="loop"):
        Bootstrap(bytes(buf)).to_tree()


def test_duplicate_names_are_reported() -> None:
    data, _, _ = _sample()
    start, names = _dirent_offsets(data, b"/sub")
    buf = bytearray(data)
    nameoff = struct.unpack_from("<H", buf, dict(names)[b"aab"] + 8)[0]
    buf[start + nameoff : start + nameoff + 3] = b"aaa"
    with pytest.raises(FormatError, match="twice"):
        Bootstrap(bytes(buf)).to_tree()


def test_wrong_chunk_digest_is_detected() -> None:
    data, blob, _ = _sample()
    tree = Bootstrap(data).to_tree()
    ref = tree.root.children()[b"sub"].children()[b"aaa"].chunks[0]
    corrupt = bytearray(blob)
    corrupt[ref.compressed_offset] ^= 0xFF
    with pytest.raises(DigestMismatch, match=f"chunk {ref.index}"):
        read_chunk(io.BytesIO(bytes(corrupt)), tree.blobs[0], ref)


def test_truncated_blob_is_reported() -> None:
    data, blob, _ = _sample()
    tree = Bootstrap(data).to_tree()
    ref = tree.root.children()[b"sub"].children()[b"aaa"].chunks[1]
    with pytest.raises(FormatError, match="file ends"):
        read_chunk(io.BytesIO(blob[: ref.compressed_offset + 10]), tree.blobs[0], ref)


_SAMPLE = _sample()[0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from([V6_BOOT.read_bytes(), _SAMPLE]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.integers(0, 1 << 16),
)
def test_fuzz_mutated_bootstraps_raise_only_format_errors(source: bytes, edits: list[tuple[int, int]],
                                                          cut: int | None) -> None:
    data = bytearray(source)
    for pos, value in edits:
        data[(pos % (len(data) - L.SUPER_OFFSET)) + L.SUPER_OFFSET if pos % 3 else pos % len(data)] = value
    if cut is not None:
        data = data[:cut]
    with contextlib.suppress(FormatError):
        _read_all(bytes(data))
