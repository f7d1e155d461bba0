"""RAFS v5 reader: real nydus-image fixtures, chunk read-back, synthetic edge cases, hostile input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import DigestMismatch, FormatError
from lazyfs.rafs import layout as L
from lazyfs.rafs.blob import read_chunk
from lazyfs.rafs.reader import detect_version
from lazyfs.rafs.tree import Inode, Tree
from lazyfs.rafs.v5 import read_v5

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nydus"
REPEATABLE = FIXTURES / "dragonflyoss-nydus" / "tests" / "texture" / "repeatable"
SHA256_BOOT = REPEATABLE / "sha256-nocompress-repeatable"
LZ4_BOOT = FIXTURES / "dragonflyoss-nydus-5be153fe/tests/texture/repeatable/blake3-lz4_block-non_repeatable"
LZ4_BLOB_ID = "d7b86b1e74e316fe945741d1a9fa1b271459fe41481e304977659e0c6ecf56ac"
LZ4_BLOB = REPEATABLE / "blobs" / LZ4_BLOB_ID
LAYER = FIXTURES / "containerd-nydus-snapshotter/pkg/filesystem/testdata/v5-bootstrap-file-size-736032.tar.gz"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared Nydus fixtures not available")


@cache
def fixture(name: str) -> bytes:
    """Bootstrap bytes of a named fixture (the snapshotter one is unpacked from its layer)."""
    if name == "synthetic":
        return build(sample(), prefetch=(3, 7))
    if name == "layer":
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(LAYER.read_bytes()))) as tar:
            member = tar.extractfile("image/image.boot")
            assert member is not None
            return member.read()
    return {"sha256": SHA256_BOOT, "lz4": LZ4_BOOT}[name].read_bytes()


def paths(tree: Tree) -> dict[bytes, Inode]:
    """Every path of *tree*."""
    return dict(tree.walk())


# -- real fixtures ------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name", ["sha256", "lz4", "layer"])
def test_fixture_parses_and_digests_verify(name: str) -> None:
    data = fixture(name)
    assert detect_version(data) == 5
    tree = read_v5(data, name, verify_digests=True)
    assert tree.root.is_dir and tree.chunk_size == 0x100000
    assert len(tree.blobs) == 1
    for _, node in tree.walk():
        assert sum(c.uncompressed_size for c in node.chunks) == (node.size if stat.S_ISREG(node.mode) else 0)
        assert all(c.blob_index == 0 and c.index < tree.blobs[0].chunk_count for c in node.chunks)


@needs_fixtures
def test_snapshotter_layer_inode_count_and_prefetch() -> None:
    data = fixture("layer")
    tree = read_v5(data)
    nodes = paths(tree)
    inodes_count = struct.unpack_from("<Q", data, 24)[0]
    assert inodes_count == 3515  # nydus-format.md §6: unique inodes, root included
    assert len({id(n) for n in nodes.values()}) == 3515
    assert len(nodes) == 3517  # two hardlink pairs
    assert tree.prefetch == [b"/"]
    assert nodes[b"/bin"].target == b"usr/bin"
    assert nodes[b"/usr/bin/perl"] is nodes[b"/usr/bin/perl5.34.0"]
    assert nodes[b"/usr/bin/gunzip"] is nodes[b"/usr/bin/uncompress"]
    blob = tree.blobs[0]
    assert (blob.compressor, blob.digester) == (Compressor.LZ4_BLOCK, Digester.BLAKE3)
    assert (blob.chunk_count, blob.compressed_size, blob.uncompressed_size) == (2515, 43090887, 77298891)


def _tree_json_listing(node: Inode) -> dict[str, Any]:
    """*node*'s children in the shape of ``tree -J`` output, keyed by name."""
    out: dict[str, Any] = {}
    for name, child in node.children().items():
        if child.is_dir:
            out[name.decode()] = ("directory", _tree_json_listing(child))
        elif stat.S_ISLNK(child.mode):
            out[name.decode()] = ("link", child.target.decode())
        else:
            out[name.decode()] = ("file", None)
    return out


def _result_listing(contents: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in contents:
        if e["type"] == "directory":
            out[e["name"]] = ("directory", _result_listing(e["contents"]))
        elif e["type"] == "link":
            out[e["name"]] = ("link", e["target"])
        else:
            out[e["name"]] = (e["type"], None)
    return out


def _result() -> tuple[dict[str, Any], dict[bytes, str]]:
    """The ``.result`` file: a ``tree -J`` listing followed by ``md5sum`` lines."""
    text = (REPEATABLE / "sha256-nocompress-repeatable.result").read_text()
    listing, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            md5s[path.encode()] = digest
    root = next(e for e in listing if e["type"] == "directory")
    return _result_listing(root["contents"]), md5s


@needs_fixtures
@pytest.mark.parametrize("name", ["sha256", "lz4"])
def test_listing_matches_result(name: str) -> None:
    expected, _ = _result()
    assert _tree_json_listing(read_v5(fixture(name)).root) == expected


@needs_fixtures
def test_hardlinks_share_one_inode() -> None:
    nodes = paths(read_v5(fixture("sha256")))
    foo = nodes[b"/hardlink-test/foo"]
    assert foo is nodes[b"/hardlink-test/test.sh"] is nodes[b"/normal-file-test/test.sh"]
    assert len(nodes) == 54 and len({id(n) for n in nodes.values()}) == 52


@needs_fixtures
def test_sha256_fixture_blob_and_attributes() -> None:
    tree = read_v5(fixture("sha256"))
    blob = tree.blobs[0]
    assert blob.blob_id == "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
    assert (blob.compressor, blob.digester) == (Compressor.NONE, Digester.SHA256)
    assert (blob.chunk_count, blob.compressed_size, blob.uncompressed_size) == (23, 3508766, 3508766)
    assert (blob.ci_offset, blob.toc) == (0, None)
    nodes = paths(tree)
    head = nodes[b"/normal-file-test/holefiles/head-hole-1"]
    assert head.size == 2097159 and [c.index for c in head.chunks] == [13, 13, 14]
    assert all(not c.compressed for c in head.chunks)
    assert nodes[b"/symlink-test/root-1"].target == b"/" * 17
    assert nodes[b"/hardlink-test"].mode == stat.S_IFDIR | 0o775 and nodes[b"/hardlink-test"].mtime == 1668232305


@needs_fixtures
def test_lz4_fixture_every_chunk_reads_back() -> None:
    """Every chunk decompresses and verifies; file contents match the md5s recorded in ``.result``."""
    tree = read_v5(fixture("lz4"), verify_digests=True)
    blob = tree.blobs[0]
    assert blob.blob_id == LZ4_BLOB_ID and blob.compressed_size == LZ4_BLOB.stat().st_size
    assert (blob.chunk_count, blob.uncompressed_size) == (23, 3508766)
    _, md5s = _result()
    seen: dict[int, tuple[int, bytes]] = {}
    with open(LZ4_BLOB, "rb") as f:
        for path, node in tree.walk():
            if not stat.S_ISREG(node.mode):
                continue
            content = b"".join(read_chunk(f, blob, ref) for ref in node.chunks)
            assert len(content) == node.size
            assert hashlib.md5(content).hexdigest() == md5s[path], path
            for ref in node.chunks:  # renumbered ci indexes name one chunk each
                assert seen.setdefault(ref.index, (ref.compressed_offset, ref.digest)) == (
                    ref.compressed_offset, ref.digest)
    assert sorted(seen) == list(range(blob.chunk_count))
    assert any(ref.compressed for _, n in tree.walk() for ref in n.chunks)


def _record_offset(data: bytes | bytearray, index: int) -> int:
    return int(struct.unpack_from("<I", data, 8192 + 4 * (index - 1))[0]) << 3


@needs_fixtures
@pytest.mark.parametrize("index", [1, 5, 48])  # root directory, regular file, symlink
def test_inode_digest_rule_is_enforced(index: int) -> None:
    data = bytearray(fixture("lz4"))
    data[_record_offset(data, index)] ^= 1
    read_v5(bytes(data))
    with pytest.raises(DigestMismatch):
        read_v5(bytes(data), verify_digests=True)


# -- synthetic images ---------------------------------------------------------------------------

BLOB_ID = "ab" * 32
ROOT_MODE = stat.S_IFDIR | 0o755


@dataclass
class Rec:
    """One inode record of a synthetic bootstrap."""

    name: bytes
    mode: int
    ino: int
    parent: int
    child_index: int = 0
    child_count: int = 0
    size: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[L.ChunkInfo] = field(default_factory=list)
    rdev: int = 0
    flags: int = 0


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def _encode(r: Rec) -> bytes:
    flags = r.flags | (4 if r.xattrs else 0)
    count = len(r.chunks) if r.chunks else r.child_count
    head = struct.pack("<32sQQIIIIQQQIIIHHIIQ8x", b"\0" * 32, r.parent, r.ino, 1, 2, 0, r.mode, r.size, 0, flags, 1,
                       r.child_index, count, len(r.name), len(r.target), r.rdev, 5, 1234)
    body = _pad(r.name) + _pad(r.target)
    if r.xattrs:
        pairs = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k + b"\0" + v for k, v in r.xattrs.items())
        body += struct.pack("<Q", len(pairs)) + _pad(pairs)
    return head + body + b"".join(c.pack() for c in r.chunks)


def build(recs: list[Rec], *, flags: int = 0x16, prefetch: tuple[int, ...] = (), ext: bool = False) -> bytes:
    """A v5 bootstrap: superblock, inode table, prefetch, blob and ext blob tables, then the records."""
    table_off = 8192
    prefetch_off = table_off + len(_pad(b"\0" * 4 * len(recs)))
    blob_off = prefetch_off + len(_pad(b"\0" * 4 * len(prefetch)))
    blob_table = _pad(b"\0" * 8 + BLOB_ID.encode())
    ext_off = blob_off + len(blob_table)
    ext_table = struct.pack("<IIQQ40x", 9, 0, 1 << 20, 1 << 20) if ext else b""
    pos = ext_off + len(ext_table)
    offsets, encoded = [], []
    for r in recs:
        offsets.append(pos >> 3)
        encoded.append(_encode(r))
        pos += len(encoded[-1])
    sb = struct.pack("<IIIIQQQQQIIIIQ", 0x52414653, 0x500, 8192, 0x100000, flags, len(recs), table_off,
                     prefetch_off, blob_off, len(recs), len(prefetch), len(BLOB_ID) + 8, int(ext), ext_off)
    return b"".join([
        sb.ljust(8192, b"\0"), _pad(struct.pack(f"<{len(recs)}I", *offsets)),
        _pad(struct.pack(f"<{len(prefetch)}I", *prefetch)), blob_table, ext_table, *encoded,
    ])


def chunk(k: int, size: int, *, index: int = 0, offset: int = 0, compressed: bool = False) -> L.ChunkInfo:
    """A chunk info for the *k*-th chunk of a file."""
    csize = size // 2 if compressed else size
    return L.ChunkInfo(bytes([k + 1]) * 32, 0, int(compressed), csize, size, offset, offset, k * 0x100000, index)


def sample() -> list[Rec]:
    """/ { dir/ { file (2 chunks), link -> file }, dev (char 1:3), fifo, hard (hardlink of dir/file) }."""
    big = 0x100000 + 10
    chunks = [chunk(0, 0x100000, index=0), chunk(1, 10, index=1, offset=0x100000, compressed=True)]
    return [
        Rec(b"/", ROOT_MODE, 1, 0, child_index=2, child_count=4),
        Rec(b"dev", stat.S_IFCHR | 0o666, 2, 1, rdev=(1 << 8) | 3),
        Rec(b"dir", stat.S_IFDIR | 0o700, 3, 1, child_index=6, child_count=2,
            xattrs={b"user.a": b"1", b"trusted.overlay.opaque": b"y"}),
        Rec(b"fifo", stat.S_IFIFO | 0o644, 4, 1),
        Rec(b"hard", stat.S_IFREG | 0o644, 7, 1, size=big, chunks=chunks),
        Rec(b"link", stat.S_IFLNK | 0o777, 6, 3, target=b"file", size=4),
        Rec(b"file", stat.S_IFREG | 0o644, 7, 3, size=big, chunks=chunks),
    ]


def test_synthetic_image_attributes() -> None:
    tree = read_v5(build(sample(), prefetch=(3, 7)))
    nodes = paths(tree)
    assert sorted(nodes) == [b"/", b"/dev", b"/dir", b"/dir/file", b"/dir/link", b"/fifo", b"/hard"]
    dev = nodes[b"/dev"]
    assert (os.major(dev.rdev), os.minor(dev.rdev)) == (1, 3)
    assert dev.rdev == os.makedev(1, 3)
    assert nodes[b"/dir"].xattrs == {b"user.a": b"1", b"trusted.overlay.opaque": b"y"}
    assert nodes[b"/dir/link"].target == b"file" and nodes[b"/dir/link"].size == 4
    assert stat.S_ISFIFO(nodes[b"/fifo"].mode)
    f = nodes[b"/dir/file"]
    assert f is nodes[b"/hard"]
    assert (f.uid, f.gid, f.mtime, f.mtime_nsec) == (1, 2, 1234, 5)
    assert [(c.index, c.compressed, c.compressed_size) for c in f.chunks] == [(0, False, 0x100000), (1, True, 5)]
    assert tree.prefetch == [b"/dir", b"/hard"]
    blob = tree.blobs[0]
    assert (blob.blob_id, blob.chunk_count, blob.compressor, blob.digester) == (
        BLOB_ID, 2, Compressor.LZ4_BLOCK, Digester.BLAKE3)
    assert (blob.compressed_size, blob.uncompressed_size) == (0x100000 + 5, 0x100000 + 10)


def test_rdev_with_large_minor() -> None:
    recs = [Rec(b"/", ROOT_MODE, 1, 0, child_index=2, child_count=1),
            Rec(b"blk", stat.S_IFBLK | 0o600, 2, 1, rdev=(8 << 8) | 0x21 | (0x123 << 20))]
    rdev = paths(read_v5(build(recs)))[b"/blk"].rdev
    assert (os.major(rdev), os.minor(rdev)) == (8, 0x12321)


def test_extended_table_keeps_recorded_indexes() -> None:
    recs = sample()
    recs[4].chunks = recs[6].chunks = [chunk(0, 0x100000, index=7), chunk(1, 10, index=3, offset=0x100000)]
    tree = read_v5(build(recs, ext=True))
    assert [c.index for c in paths(tree)[b"/hard"].chunks] == [7, 3]
    assert (tree.blobs[0].chunk_count, tree.blobs[0].uncompressed_size) == (9, 1 << 20)


def _broken(mutate: Any, **kw: Any) -> bytes:
    recs = sample()
    mutate(recs)
    return build(recs, **kw)


@pytest.mark.parametrize(("mutate", "kw", "message"), [
    (lambda r: setattr(r[2], "child_index", 1), {}, "out of range"),  # directory points at its ancestor
    (lambda r: setattr(r[2], "child_index", 3), {}, "out of range"),  # ... or at itself
    (lambda r: setattr(r[0], "child_count", 5), {}, "names parent"),  # root also claims dir's child
    (lambda r: setattr(r[2], "ino", 1), {}, "shares i_ino"),  # a directory claiming the root's inode
    (lambda r: setattr(r[5], "parent", 1), {}, "names parent"),
    (lambda r: setattr(r[6], "name", b"link"), {}, "twice"),
    (lambda r: setattr(r[6], "name", b".."), {}, "invalid file name"),
    (lambda r: setattr(r[4], "mode", stat.S_IFREG | 0o755), {}, "shares i_ino"),
    (lambda r: setattr(r[3], "ino", 3), {}, "shares i_ino"),  # a fifo claiming a directory's inode
    (lambda r: setattr(r[4], "size", 5), {}, "chunks for a 5-byte file"),
    (lambda r: r[4].__dict__.update(flags=8, size=1 << 22), {}, "hole"),
    (lambda r: setattr(r[1], "mode", 0o170644), {}, "invalid mode"),
    (lambda r: setattr(r[5], "target", b""), {}, "must have a target"),
    (lambda r: setattr(r[0], "mode", stat.S_IFIFO | 0o644), {}, "root"),
    (lambda r: r[4].chunks.reverse(), {}, "does not cover"),
    (lambda r: setattr(r[4].chunks[0], "blob_index", 1), {}, "names blob 1"),
    (lambda r: setattr(r[4].chunks[1], "compressed_size", 10), {}, "implausible compressed size"),
    (lambda r: None, {"flags": 0x2}, "exactly one digest"),
    (lambda r: None, {"flags": 0x16 | 0x1000}, "unknown superblock flags"),
    (lambda r: setattr(r[4].chunks[1], "index", 0), {"ext": True}, "names different chunks"),
    (lambda r: setattr(r[4].chunks[1], "index", 9), {"ext": True}, "beyond"),
])
def test_synthetic_corruption_is_rejected(mutate: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_v5(_broken(mutate, **kw))


def test_overlapping_records_are_rejected() -> None:
    data = bytearray(build(sample()))
    struct.pack_into("<I", data, 8192 + 4 * 3, struct.unpack_from("<I", data, 8192 + 4)[0])  # fifo -> dev record
    with pytest.raises(FormatError, match="overlap"):
        read_v5(bytes(data))


def test_bad_blob_id_and_superblock_fields() -> None:
    good = build(sample())
    blob_off = struct.unpack_from("<Q", good, 48)[0]
    for offset, value, fmt, message in [
        (blob_off + 8, ord("/"), "<B", "invalid id"),
        (4, 0x600, "<I", "not RAFS v5"),
        (8, 4096, "<I", "superblock size"),
        (12, 0x3000, "<I", "chunk size"),
        (24, 99, "<Q", "impossible"),
        (56, 10**6, "<I", "impossible"),
        (48, 100, "<Q", "outside"),
        (32, blob_off, "<Q", "overlaps"),
    ]:
        data = bytearray(good)
        struct.pack_into(fmt, data, offset, value)
        with pytest.raises(FormatError, match=message):
            read_v5(bytes(data))


# -- hostile input ------------------------------------------------------------------------------


@needs_fixtures
def test_every_truncation_is_a_format_error() -> None:
    data = fixture("lz4")
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            read_v5(data[:cut])
    big = fixture("layer")
    for cut in range(0, len(big), len(big) // 40):
        with pytest.raises(FormatError):
            read_v5(big[:cut])


def _parse_or_format_error(data: bytes) -> None:
    """Parsing either fails with FormatError or yields a sane tree."""
    try:
        tree = read_v5(data, verify_digests=True)
    except FormatError:
        return
    for _, node in tree.walk():
        for ref in node.chunks:
            assert ref.blob_index < len(tree.blobs)
            assert ref.index < tree.blobs[ref.blob_index].chunk_count


_positions = st.one_of(st.integers(0, 87), st.integers(8192, 18583))


@needs_fixtures
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(_positions, st.integers(1, 255)), min_size=1, max_size=6),
       name=st.sampled_from(["sha256", "lz4", "synthetic"]))
def test_flipped_bytes(flips: list[tuple[int, int]], name: str) -> None:
    data = bytearray(fixture(name))
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    _parse_or_format_error(bytes(data))


_FIELD_VALUES = st.sampled_from([0, 1, 2, 7, 8, 0xFF, 0x1000, 0x2000, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 63])


@needs_fixtures
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(_positions, _FIELD_VALUES, st.sampled_from(["<B", "<H", "<I", "<Q"])),
                       min_size=1, max_size=4),
       name=st.sampled_from(["sha256", "lz4", "synthetic"]))
def test_overwritten_fields(writes: list[tuple[int, int, str]], name: str) -> None:
    data = bytearray(fixture(name))
    for pos, value, fmt in writes:
        size = struct.calcsize(fmt)
        struct.pack_into(fmt, data, min(pos & ~(size - 1), len(data) - size), value & ((1 << 8 * size) - 1))
    _parse_or_format_error(bytes(data))
