"""Build a :class:`~lazyfs.rafs.tree.Tree` from a local directory, streaming file data into a blob."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from lazyfs.errors import BuildError
from lazyfs.rafs.blob import BlobWriter
from lazyfs.rafs.tree import ChunkRef, Inode, Tree, check_name


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """The extended attributes of *path* (without following symlinks)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def _file_chunks(path: bytes, size: int, writer: BlobWriter) -> list[ChunkRef]:
    """Chunk a file, skipping the reads of whole chunks that lie in holes of a sparse file."""
    with open(path, "rb") as f:
        refs = []
        for offset in range(0, size, writer.chunk_size):
            length = min(writer.chunk_size, size - offset)
            if _is_hole(f, offset, length):
                refs.append(writer.add_zero_chunk(length))
            else:
                f.seek(offset)
                refs.extend(writer.add_file(f, length))
        return refs


def _is_hole(f: BinaryIO, offset: int, length: int) -> bool:
    try:
        data = os.lseek(f.fileno(), offset, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data after offset: the rest is a hole
    return data >= offset + length


def build_tree_from_dir(root: str | os.PathLike[str], writer: BlobWriter) -> Tree:
    """Walk *root* (not following symlinks) into a Tree; hardlinks become shared inodes."""
    base = os.fsencode(root)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{root} is not a directory")
    tree = Tree(root=_inode(base, st), chunk_size=writer.chunk_size)
    links: dict[tuple[int, int], Inode] = {}
    stack = [(base, tree.root)]
    while stack:
        path, node = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                name = check_name(entry.name if isinstance(entry.name, bytes) else os.fsencode(entry.name))
                child_path = path + b"/" + name
                st = os.lstat(child_path)
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
                    node.children()[name] = links[key]
                    continue
                child = _inode(child_path, st)
                if stat.S_ISREG(st.st_mode):
                    child.chunks = _file_chunks(child_path, st.st_size, writer)
                    if st.st_nlink > 1:
                        links[key] = child
                node.children()[name] = child
                if child.is_dir:
                    stack.append((child_path, child))
    return tree


def _inode(path: bytes, st: os.stat_result) -> Inode:
    node = Inode(
        mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
        mtime_nsec=st.st_mtime_ns % 10**9, xattrs=read_xattrs(path),
    )
    if stat.S_ISDIR(st.st_mode):
        node.entries = {}
    elif stat.S_ISLNK(st.st_mode):
        node.target = os.readlink(path)
        node.size = len(node.target)
    elif stat.S_ISREG(st.st_mode):
        node.size = st.st_size
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = st.st_rdev
    return node
