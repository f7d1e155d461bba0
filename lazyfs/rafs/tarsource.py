"""Build a :class:`Tree` from an (uncompressed) OCI layer tar stream.

The tar is read strictly front to back, so *stream* may be a pipe. File data goes chunk by chunk
into a :class:`BlobWriter`; only metadata is kept in memory. Whiteouts (``.wh.*``) stay ordinary
entries: :mod:`lazyfs.rafs.merge` applies them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from typing import IO, BinaryIO, Self, cast
from urllib.parse import unquote_to_bytes

from lazyfs.errors import BuildError, UnsafeEntryError
from lazyfs.rafs.blob import BlobWriter
from lazyfs.rafs.tree import ChunkRef, Inode, Tree, split_path

ENCODING, ERRORS = "utf-8", "surrogateescape"
MAX_SPARSE_SIZE = 1 << 34  # apparent size limit of a sparse member: holes are hashed like data
MAX_EXTENDED_HEADER = 1 << 24  # pax and GNU long-name headers are read into memory whole
_EXTENDED_TYPES = (
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK
)
_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
_PAX_TIME = re.compile(r"(-?)(\d{1,20})(?:\.(\d*))?", re.ASCII)
_U32, _U64 = 1 << 32, 1 << 64
_SPECIAL_TYPES = {
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that reports corrupt or truncated headers instead of ending the archive quietly,
    and refuses extended headers too large to hold in memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        if not buf or buf.count(0) == tarfile.BLOCKSIZE:
            return super().frombuf(buf, encoding, errors)  # end of archive
        if len(buf) != tarfile.BLOCKSIZE:
            raise BuildError(f"layer tar ends inside a header ({len(buf)} of {tarfile.BLOCKSIZE} bytes)")
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as e:
            raise BuildError(f"layer tar has a corrupt header: {e}") from None
        if info.type in _EXTENDED_TYPES and info.size > MAX_EXTENDED_HEADER:
            raise BuildError(f"layer tar has a {info.size}-byte extended header (limit {MAX_EXTENDED_HEADER})")
        return info


def build_tree_from_tar(stream: IO[bytes], writer: BlobWriter) -> Tree:
    """Read a layer tar from *stream*, store file data in *writer* and return the tree.

    ``tree.blobs`` is left empty: the caller appends the BlobInfo from ``writer.finish()``.
    """
    tree = Tree(chunk_size=writer.chunk_size)
    tree.root.implicit = True
    for tf, info in _members(stream):
        _add_member(tree, tf, info, writer)
    return tree


def _members(stream: IO[bytes]) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The archive and each member in turn; malformed headers raise BuildError."""
    try:
        with tarfile.open(
            fileobj=stream, mode="r|", encoding=ENCODING, errors=ERRORS, tarinfo=_StrictTarInfo
        ) as tf:
            for info in tf:
                yield tf, info
    except (tarfile.TarError, ValueError, IndexError) as e:  # tarfile leaks the last two on bad sparse headers
        raise BuildError(f"invalid layer tar: {e}") from None


def _encode(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def _add_member(tree: Tree, tf: tarfile.TarFile, info: tarfile.TarInfo, writer: BlobWriter) -> None:
    path = _encode(info.name)
    parts = _entry_path(path)
    if not parts:
        if not info.isdir():
            raise BuildError(f"tar entry {path!r} names the root but is not a directory")
        tree.root.take_attrs(_make_inode(tree, tf, info, writer, path))
        return
    parent = _parent_dir(tree, parts, path)
    node = _make_inode(tree, tf, info, writer, path)
    old = parent.children().get(parts[-1])
    if old is not None and old.is_dir and node.is_dir:
        old.take_attrs(node)
    else:
        parent.children()[parts[-1]] = node


def _entry_path(path: bytes) -> list[bytes]:
    """Checked components of a tar member path; absolute paths and ``..`` are refused."""
    if path.startswith(b"/"):
        raise UnsafeEntryError(f"tar entry {path!r} has an absolute path")
    try:
        return split_path(path)
    except UnsafeEntryError as e:
        raise UnsafeEntryError(f"tar entry {path!r}: {e}") from None


def _parent_dir(tree: Tree, parts: list[bytes], path: bytes) -> Inode:
    """The directory that will hold *parts*, creating missing parents (0755, root-owned)."""
    node = tree.root
    for depth, part in enumerate(parts[:-1], 1):
        entries = node.children()
        child = entries.get(part)
        if child is None:
            child = entries[part] = Inode.directory()
            child.implicit = True
        elif stat.S_ISLNK(child.mode):
            where = b"/".join(parts[:depth])
            raise UnsafeEntryError(f"tar entry {path!r} goes through symlink {where!r}")
        elif not child.is_dir:
            where = b"/".join(parts[:depth])
            raise BuildError(f"tar entry {path!r}: parent {where!r} is not a directory")
        node = child
    return node


def _make_inode(
    tree: Tree, tf: tarfile.TarFile, info: tarfile.TarInfo, writer: BlobWriter, path: bytes
) -> Inode:
    """The inode a member describes; a hardlink returns the existing target inode."""
    if info.islnk():
        return _hardlink_target(tree, info, path)
    node = Inode(mode=_mode(info, path), xattrs=_xattrs(info, path))
    node.uid, node.gid = _id(info.uid, "uid", path), _id(info.gid, "gid", path)
    node.mtime, node.mtime_nsec = _mtime(info, path)
    if info.isdir():
        node.entries = {}
    elif info.isreg():
        node.size = info.size
        node.chunks = _file_chunks(tf, info, writer, path)
    elif info.issym():
        node.target = _encode(info.linkname)
        node.size = len(node.target)
        if not node.target:
            raise BuildError(f"tar entry {path!r} is a symlink with an empty target")
    elif info.ischr() or info.isblk():
        node.rdev = _rdev(info, path)
    return node


def _mode(info: tarfile.TarInfo, path: bytes) -> int:
    """Full st_mode: permission bits from the header, type bits from the entry type."""
    perms = info.mode & 0o7777
    if info.isreg():
        return stat.S_IFREG | perms
    if info.isdir():
        return stat.S_IFDIR | perms
    kind = _SPECIAL_TYPES.get(info.type)
    if kind is None:
        raise BuildError(f"tar entry {path!r} has unsupported type {info.type!r}")
    return kind | perms


def _hardlink_target(tree: Tree, info: tarfile.TarInfo, path: bytes) -> Inode:
    link = _encode(info.linkname)
    target = tree.lookup(b"/".join(_entry_path(link)))
    if target is None:
        raise BuildError(f"tar entry {path!r} is a hardlink to {link!r}, which does not exist yet")
    if target.is_dir:
        raise UnsafeEntryError(f"tar entry {path!r} is a hardlink to directory {link!r}")
    return target


def _id(value: int, what: str, path: bytes) -> int:
    if not 0 <= value < _U32:
        raise BuildError(f"tar entry {path!r} has {what} {value} outside 0..2^32-1")
    return value


def _mtime(info: tarfile.TarInfo, path: bytes) -> tuple[int, int]:
    """(seconds, nanoseconds) from the pax ``mtime`` record or the header; pre-1970 becomes 0."""
    raw = info.pax_headers.get("mtime")
    if raw is None:
        secs, nsec = int(info.mtime), 0
    else:
        match = _PAX_TIME.fullmatch(raw)
        if match is None:
            raise BuildError(f"tar entry {path!r} has an invalid pax mtime {raw!r}")
        negative, digits, frac = match.groups()
        secs = -1 if negative else int(digits)
        nsec = int((frac or "")[:9].ljust(9, "0"))
    if secs < 0:
        return 0, 0
    if secs >= _U64:
        raise BuildError(f"tar entry {path!r} has mtime {secs} beyond 2^64-1")
    return secs, nsec


def _rdev(info: tarfile.TarInfo, path: bytes) -> int:
    try:
        return os.makedev(info.devmajor, info.devminor)
    except (OverflowError, ValueError):
        raise BuildError(
            f"tar entry {path!r} has invalid device number {info.devmajor}:{info.devminor}"
        ) from None


def _xattrs(info: tarfile.TarInfo, path: bytes) -> dict[bytes, bytes]:
    """Extended attributes from ``LIBARCHIVE.xattr.*`` (base64) and ``SCHILY.xattr.*`` records."""
    xattrs: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(_LIBARCHIVE_XATTR):
            name = unquote_to_bytes(key[len(_LIBARCHIVE_XATTR) :])
            xattrs[_xattr_name(name, path)] = _base64(value, name, path)
    for key, value in info.pax_headers.items():
        if key.startswith(_SCHILY_XATTR):
            xattrs[_xattr_name(_encode(key[len(_SCHILY_XATTR) :]), path)] = _encode(value)
    return xattrs


def _xattr_name(name: bytes, path: bytes) -> bytes:
    if not name or b"\0" in name:
        raise BuildError(f"tar entry {path!r} has an invalid xattr name {name!r}")
    return name


def _base64(value: str, name: bytes, path: bytes) -> bytes:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BuildError(f"tar entry {path!r}: xattr {name!r} is not valid base64") from None


def _file_chunks(
    tf: tarfile.TarFile, info: tarfile.TarInfo, writer: BlobWriter, path: bytes
) -> list[ChunkRef]:
    """Stream the member's data into the blob."""
    if info.size < 0:
        raise BuildError(f"tar entry {path!r} has negative size {info.size}")
    if info.issparse():
        _check_sparse(info, path)
    src = tf.extractfile(info)
    if src is None:
        raise BuildError(f"tar entry {path!r} has no readable data")
    try:
        return writer.add_file(cast(BinaryIO, src), info.size)
    except (tarfile.TarError, BuildError) as e:
        raise BuildError(f"tar entry {path!r} ({info.size} bytes) is truncated or corrupt: {e}") from None


def _check_sparse(info: tarfile.TarInfo, path: bytes) -> None:
    """Refuse sparse maps that are unordered, overlapping, out of range or expand too far."""
    if info.size > MAX_SPARSE_SIZE:
        raise BuildError(f"sparse tar entry {path!r} expands to {info.size} bytes (limit {MAX_SPARSE_SIZE})")
    end = 0
    for offset, length in cast(list[tuple[int, int]], info.sparse or []):
        if length == 0:
            continue
        if offset < end or length < 0 or offset + length > info.size:
            raise BuildError(f"sparse tar entry {path!r} has an invalid sparse map")
        end = offset + length
