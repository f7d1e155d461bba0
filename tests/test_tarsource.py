"""Tests for building a Tree from a layer tar stream."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import stat
import tarfile
import time

import pytest

from lazyfs.errors import BuildError, LazyfsError, UnsafeEntryError
from lazyfs.rafs import tarsource
from lazyfs.rafs.blob import BlobWriter, read_chunk
from lazyfs.rafs.tarsource import build_tree_from_tar
from lazyfs.rafs.tree import Inode, Tree

CHUNK = 0x1000
FORMATS = [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\xff\xfe\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

Member = tuple[tarfile.TarInfo, bytes | None]


def member(name: str | bytes, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> Member:
    """A TarInfo (with data for regular files); bytes names are stored byte for byte."""
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    info = tarfile.TarInfo(text)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def make_tar(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def build(raw: bytes) -> tuple[Tree, bytes]:
    """Build a tree through a real BlobWriter; returns the tree (with its blob) and the blob bytes."""
    out = io.BytesIO()
    writer = BlobWriter(out, chunk_size=CHUNK)
    src = io.BytesIO(raw)
    tree = build_tree_from_tar(src, writer)
    assert not src.closed
    tree.blobs.append(writer.finish())
    return tree, out.getvalue()


def node(tree: Tree, path: bytes) -> Inode:
    found = tree.lookup(path)
    assert found is not None, path
    return found


def file_data(tree: Tree, blob: bytes, path: bytes) -> bytes:
    inode = node(tree, path)
    data = b"".join(read_chunk(io.BytesIO(blob), tree.blobs[c.blob_index], c) for c in inode.chunks)
    assert len(data) == inode.size
    return data


def ustar_header(name: bytes, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A raw ustar header (any size claim, no data)."""
    hdr = bytearray(tarfile.BLOCKSIZE)
    hdr[0 : len(name)] = name
    hdr[100:108] = b"0000644\0"
    hdr[108:124] = b"0000000\0" * 2
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"
    hdr[156:157] = kind
    hdr[257:265] = b"ustar\x0000"
    return with_checksum(hdr)


def with_checksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def pax_header(records: dict[bytes, bytes]) -> bytes:
    """A raw pax extended header with byte records, as GNU tar writes binary xattrs."""
    body = b""
    for key, value in records.items():
        text = b" " + key + b"=" + value + b"\n"
        total = len(text) + len(str(len(text)))
        total += len(str(total)) - len(str(len(text)))
        body += str(total).encode() + text
    padded = body + b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    return ustar_header(b"PaxHeaders/x", len(body), tarfile.XHDTYPE) + padded


# ---------------------------------------------------------------- entry types and attributes


@pytest.mark.parametrize("fmt", FORMATS)
def test_entry_types_and_attributes(fmt: int) -> None:
    payload = random.Random(1).randbytes(3 * CHUNK + 123)
    raw = make_tar([
        member("./etc", tarfile.DIRTYPE, mode=0o1777, uid=7, gid=8, mtime=1000),
        member("./etc/passwd", data=payload, mode=0o4755, uid=4294967295, gid=65534, mtime=1700000000),
        member("etc/empty", tarfile.AREGTYPE),
        member("etc/link", tarfile.SYMTYPE, linkname="../target/x"),
        member("etc/hard", tarfile.LNKTYPE, linkname="./etc/passwd"),
        member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=300),
        member("run/fifo", tarfile.FIFOTYPE, mode=0o2600),
    ], fmt)
    tree, blob = build(raw)
    assert tree.chunk_size == CHUNK and len(tree.blobs) == 1
    etc = node(tree, b"/etc")
    assert etc.mode == stat.S_IFDIR | 0o1777 and (etc.uid, etc.gid, etc.mtime) == (7, 8, 1000)
    passwd = node(tree, b"/etc/passwd")
    assert passwd.mode == stat.S_IFREG | 0o4755
    assert (passwd.uid, passwd.gid, passwd.mtime, passwd.size) == (4294967295, 65534, 1700000000, len(payload))
    assert len(passwd.chunks) == 4 and file_data(tree, blob, b"/etc/passwd") == payload
    assert node(tree, b"/etc/hard") is passwd
    empty = node(tree, b"/etc/empty")
    assert empty.mode == stat.S_IFREG | 0o644 and empty.size == 0 and empty.chunks == []
    link = node(tree, b"/etc/link")
    assert stat.S_ISLNK(link.mode) and link.target == b"../target/x" and link.size == 11
    assert node(tree, b"/dev/null").mode == stat.S_IFCHR | 0o666
    assert node(tree, b"/dev/null").rdev == os.makedev(1, 3)
    assert node(tree, b"/dev/sda").mode == stat.S_IFBLK | 0o644
    assert node(tree, b"/dev/sda").rdev == os.makedev(8, 300)
    assert node(tree, b"/run/fifo").mode == stat.S_IFIFO | 0o2600
    implicit = node(tree, b"/dev")
    assert implicit.mode == stat.S_IFDIR | 0o755 and (implicit.uid, implicit.gid) == (0, 0)


def test_contiguous_file_type() -> None:
    info, data = member("c", data=b"contiguous")
    info.type = tarfile.CONTTYPE
    tree, blob = build(make_tar([(info, data)], tarfile.GNU_FORMAT))
    assert file_data(tree, blob, b"/c") == b"contiguous"


def test_identical_chunks_are_shared() -> None:
    data = b"a" * CHUNK
    tree, _ = build(make_tar([member("x", data=data * 2), member("y", data=data)]))
    assert node(tree, b"/x").chunks[0] == node(tree, b"/x").chunks[1] == node(tree, b"/y").chunks[0]
    assert tree.blobs[0].chunk_count == 1


def test_pax_mtime_nanoseconds() -> None:
    info, data = member("f", mtime=5)
    info.pax_headers = {"mtime": "1700000000.123456789"}
    early, _ = member("old")
    early.pax_headers = {"mtime": "-12.5"}
    tree, _ = build(make_tar([(info, data), (early, None)]))
    f = node(tree, b"/f")
    assert (f.mtime, f.mtime_nsec) == (1700000000, 123456789)
    assert (node(tree, b"/old").mtime, node(tree, b"/old").mtime_nsec) == (0, 0)


def test_invalid_pax_mtime() -> None:
    info, _ = member("f")
    info.pax_headers = {"mtime": "soon"}
    with pytest.raises(BuildError, match="invalid pax mtime"):
        build(make_tar([(info, b"")]))


# ---------------------------------------------------------------- xattrs


def test_binary_xattr_roundtrip_through_python_writer() -> None:
    info, data = member("bin/ping", data=b"\x7fELF")
    info.pax_headers = {
        "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.comment": "héllo",
    }
    tree, _ = build(make_tar([(info, data)]))
    assert node(tree, b"/bin/ping").xattrs == {
        b"security.capability": CAP,
        b"user.comment": "héllo".encode(),
    }


def test_binary_xattr_raw_gnu_tar_style() -> None:
    records = {
        b"SCHILY.xattr.security.capability": CAP,
        b"SCHILY.xattr.user.\xff": b"\n\xff\x00=",
        b"LIBARCHIVE.xattr.user.b64%20name": base64.b64encode(b"\x00\x01\x02").rstrip(b"="),
    }
    raw = pax_header(records) + ustar_header(b"f", 0) + b"\0" * 1024
    tree, _ = build(raw)
    assert node(tree, b"/f").xattrs == {
        b"security.capability": CAP,
        b"user.\xff": b"\n\xff\x00=",
        b"user.b64 name": b"\x00\x01\x02",
    }


def test_bad_libarchive_xattr() -> None:
    raw = pax_header({b"LIBARCHIVE.xattr.user.x": b"!!!"}) + ustar_header(b"f", 0) + b"\0" * 1024
    with pytest.raises(BuildError, match="not valid base64"):
        build(raw)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_and_non_utf8_names(fmt: int) -> None:
    long = b"n" * 255
    odd = b"\xff\xfe"
    raw = make_tar([
        member(b"d/" + long, data=b"long"),
        member(b"d/" + odd, data=b"odd"),
        member(b"d/" + odd + b"link", tarfile.SYMTYPE, linkname=odd.decode("utf-8", "surrogateescape")),
    ], fmt)
    tree, blob = build(raw)
    assert sorted(node(tree, b"/d").children()) == sorted([long, odd, odd + b"link"])
    assert file_data(tree, blob, b"/d/" + long) == b"long"
    assert file_data(tree, blob, b"/d/" + odd) == b"odd"
    assert node(tree, b"/d/" + odd + b"link").target == odd


def test_name_longer_than_255_bytes() -> None:
    with pytest.raises(UnsafeEntryError, match="longer than 255"):
        build(make_tar([member("x" * 256)]))


def test_many_entries_in_one_directory() -> None:
    members = [member(f"big/f{i:05d}") for i in range(10_500)]
    start = time.monotonic()
    tree, _ = build(make_tar(members))
    assert len(node(tree, b"/big").children()) == 10_500
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- path semantics


def test_root_entry_and_dot_slash() -> None:
    raw = make_tar([member("./", tarfile.DIRTYPE, mode=0o700, uid=3), member("./a/./b", data=b"x")])
    tree, _ = build(raw)
    assert tree.root.mode == stat.S_IFDIR | 0o700 and tree.root.uid == 3
    assert node(tree, b"/a/b").size == 1


def test_root_must_be_a_directory() -> None:
    with pytest.raises(BuildError, match="names the root"):
        build(make_tar([member(".", data=b"x")]))


def test_later_entry_replaces_earlier() -> None:
    raw = make_tar([
        member("f", data=b"old"),
        member("h", tarfile.LNKTYPE, linkname="f"),
        member("f", data=b"new"),
        member("d", tarfile.DIRTYPE),
        member("d/child"),
        member("d", data=b"file now"),
        member("s", data=b"file"),
        member("s", tarfile.DIRTYPE),
    ])
    tree, blob = build(raw)
    assert file_data(tree, blob, b"/f") == b"new"
    assert file_data(tree, blob, b"/h") == b"old"
    assert file_data(tree, blob, b"/d") == b"file now"
    assert node(tree, b"/s").children() == {}


def test_directory_over_directory_keeps_children() -> None:
    info, _ = member("d", tarfile.DIRTYPE, mode=0o700, uid=5, mtime=99)
    info.pax_headers = {"SCHILY.xattr.user.a": "1"}
    raw = make_tar([member("d", tarfile.DIRTYPE), member("d/keep"), (info, None)])
    tree, _ = build(raw)
    d = node(tree, b"/d")
    assert list(d.children()) == [b"keep"]
    assert (d.mode, d.uid, d.mtime, d.xattrs) == (stat.S_IFDIR | 0o700, 5, 99, {b"user.a": b"1"})


def test_whiteouts_are_kept() -> None:
    tree, _ = build(make_tar([member("a/.wh.b"), member("a/.wh..wh..opq")]))
    assert sorted(node(tree, b"/a").children()) == [b".wh..wh..opq", b".wh.b"]


def test_empty_archive() -> None:
    tree, _ = build(b"\0" * 10240)
    assert tree.root.children() == {}


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x", "a/.."])
def test_escaping_paths_are_refused(name: str) -> None:
    with pytest.raises(UnsafeEntryError, match="tar entry"):
        build(make_tar([member(name, data=b"x")]))


def test_entry_through_symlink_is_refused() -> None:
    raw = make_tar([member("lnk", tarfile.SYMTYPE, linkname="/etc"), member("lnk/passwd", data=b"x")])
    with pytest.raises(UnsafeEntryError, match="goes through symlink b'lnk'"):
        build(raw)


def test_entry_through_file_is_refused() -> None:
    raw = make_tar([member("f", data=b"x"), member("f/g")])
    with pytest.raises(BuildError, match="parent b'f' is not a directory"):
        build(raw)


def test_hardlink_to_missing_target() -> None:
    with pytest.raises(BuildError, match="hardlink to b'nope', which does not exist"):
        build(make_tar([member("h", tarfile.LNKTYPE, linkname="nope")]))


def test_hardlink_to_directory() -> None:
    raw = make_tar([member("d", tarfile.DIRTYPE), member("h", tarfile.LNKTYPE, linkname="d")])
    with pytest.raises(UnsafeEntryError, match="hardlink to directory"):
        build(raw)


def test_hardlink_with_escaping_target() -> None:
    with pytest.raises(UnsafeEntryError, match="absolute path"):
        build(make_tar([member("h", tarfile.LNKTYPE, linkname="/etc/shadow")]))


def test_empty_symlink_target() -> None:
    with pytest.raises(BuildError, match="empty target"):
        build(make_tar([member("s", tarfile.SYMTYPE, linkname="")]))


def test_unsupported_entry_type() -> None:
    with pytest.raises(BuildError, match="unsupported type b'V'"):
        build(ustar_header(b"label", 0, b"V") + b"\0" * 1024)


def test_truncated_mid_file() -> None:
    raw = make_tar([member("a", data=b"x" * 100), member("big", data=b"y" * (3 * CHUNK))])
    with pytest.raises(BuildError, match=r"tar entry b'big' \(12288 bytes\) is truncated"):
        build(raw[: 512 * 4 + 5000])


def test_huge_claimed_size_with_short_data() -> None:
    raw = ustar_header(b"huge", 8 << 30) + b"z" * 5000
    start = time.monotonic()
    with pytest.raises(BuildError, match="truncated or corrupt"):
        build(raw)
    assert time.monotonic() - start < 5


def test_huge_extended_header_is_refused() -> None:
    raw = ustar_header(b"PaxHeaders/x", 1 << 40, tarfile.XHDTYPE) + b"1" * 5000
    with pytest.raises(BuildError, match="extended header"):
        build(raw)


def test_negative_size() -> None:
    hdr = bytearray(ustar_header(b"neg", 0))
    hdr[124:136] = b"\xff" * 12  # base-256 -1
    with pytest.raises(BuildError, match="negative size -1"):
        build(with_checksum(hdr) + b"\0" * 1024)


def test_malformed_pax_sparse_map() -> None:
    records = {b"GNU.sparse.map": b"0,x", b"GNU.sparse.realsize": b"10"}
    raw = pax_header(records) + ustar_header(b"f", 1) + b"a".ljust(512, b"\0") + b"\0" * 1024
    with pytest.raises(BuildError, match="invalid layer tar"):
        build(raw)


def test_truncated_header() -> None:
    raw = make_tar([member("a", data=b"x")])
    with pytest.raises(BuildError, match="ends inside a header"):
        build(raw[:1024] + raw[:100])


def test_corrupt_header_in_the_middle() -> None:
    raw = bytearray(make_tar([member("a", data=b"x"), member("b", data=b"y")]))
    raw[1024 + 148] ^= 1  # checksum of b's header
    with pytest.raises(BuildError, match="corrupt header"):
        build(bytes(raw))


def test_empty_stream() -> None:
    with pytest.raises(BuildError, match="invalid layer tar"):
        build(b"")


def test_out_of_range_uid() -> None:
    raw = pax_header({b"uid": b"4294967296"}) + ustar_header(b"f", 0) + b"\0" * 1024
    with pytest.raises(BuildError, match="uid 4294967296 outside"):
        build(raw)


def test_random_corruption_raises_only_lazyfs_errors() -> None:
    base = make_tar([
        member("d", tarfile.DIRTYPE),
        member("d/f", data=b"data" * 500),
        member("d/l", tarfile.SYMTYPE, linkname="f"),
        member("d/h", tarfile.LNKTYPE, linkname="d/f"),
        member("d/" + "n" * 150, data=b"q"),
    ])
    rng = random.Random(7)
    for _ in range(400):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        with contextlib.suppress(LazyfsError):
            build(bytes(raw[: rng.randint(0, len(raw))]))


# ---------------------------------------------------------------- sparse members


def gnu_sparse(name: bytes, realsize: int, blocks: list[tuple[int, bytes]]) -> bytes:
    """An old-style GNU sparse ('S') member with up to four data blocks."""
    stored = b"".join(data for _, data in blocks)
    hdr = bytearray(ustar_header(name, len(stored), tarfile.GNUTYPE_SPARSE))
    hdr[257:265] = b"ustar  \0"
    for i, (offset, data) in enumerate(blocks):
        hdr[386 + 24 * i : 410 + 24 * i] = b"%011o\0%011o\0" % (offset, len(data))
    hdr[483:495] = b"%011o\0" % realsize
    return with_checksum(hdr) + stored + b"\0" * (-len(stored) % 512)


def test_gnu_sparse_member() -> None:
    raw = gnu_sparse(b"sp", 5 * CHUNK, [(CHUNK, b"a" * 100), (3 * CHUNK, b"b" * 10)]) + b"\0" * 1024
    tree, blob = build(raw)
    expect = bytearray(5 * CHUNK)
    expect[CHUNK : CHUNK + 100] = b"a" * 100
    expect[3 * CHUNK : 3 * CHUNK + 10] = b"b" * 10
    assert file_data(tree, blob, b"/sp") == expect


def test_gnu_sparse_with_overlapping_map() -> None:
    raw = gnu_sparse(b"sp", 5 * CHUNK, [(CHUNK, b"a" * 100), (CHUNK + 50, b"b")]) + b"\0" * 1024
    with pytest.raises(BuildError, match="invalid sparse map"):
        build(raw)


def test_gnu_sparse_too_large() -> None:
    raw = gnu_sparse(b"sp", tarsource.MAX_SPARSE_SIZE + 1, [(0, b"a")]) + b"\0" * 1024
    with pytest.raises(BuildError, match="expands to"):
        build(raw)
