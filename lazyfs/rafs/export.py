"""``lazyfs export`` and ``lazyfs unpack``: materialise blob data files and whole trees.

``<blob_id>.blob.data`` holds every chunk uncompressed at its 4 KiB-aligned uncompressed offset:
nydusd's cache layout, and what the kernel EROFS driver reads as a device (``-o device=``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from lazyfs.errors import FormatError
from lazyfs.rafs.blob import read_chunk
from lazyfs.rafs.tree import BlobInfo, ChunkRef, Inode, Tree


def blob_path(blob_dir: Path, blob: BlobInfo) -> Path:
    """The local file of *blob* in *blob_dir*, or a FormatError naming what is missing."""
    path = blob_dir / blob.blob_id
    if not path.is_file():
        raise FormatError(f"blob {blob.blob_id} not found in {blob_dir}")
    return path


def unique_chunks(tree: Tree) -> dict[int, dict[int, ChunkRef]]:
    """Every distinct chunk, by blob index then ci index."""
    out: dict[int, dict[int, ChunkRef]] = {i: {} for i in range(len(tree.blobs))}
    for _, node in tree.walk():
        for c in node.chunks:
            out[c.blob_index][c.index] = c
    return out


def export_blob_data(tree: Tree, blob_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``<blob_id>.blob.data`` for every blob of *tree*; return the paths in blob order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for blob_index, chunks in unique_chunks(tree).items():
        blob = tree.blobs[blob_index]
        target = out_dir / f"{blob.blob_id}.blob.data"
        tmp = target.with_suffix(".data.tmp")
        with open(blob_path(Path(blob_dir), blob), "rb") as src, open(tmp, "wb") as dst:
            dst.truncate(blob.uncompressed_size)
            for ref in sorted(chunks.values(), key=lambda c: c.compressed_offset):
                if ref.uncompressed_offset + ref.uncompressed_size > blob.uncompressed_size:
                    raise FormatError(f"blob {blob.blob_id} chunk {ref.index} lies past the blob's end")
                dst.seek(ref.uncompressed_offset)
                dst.write(read_chunk(src, blob, ref))
        os.replace(tmp, target)
        paths.append(target)
    return paths


def file_contents(node: Inode, blobs: list[BlobInfo], files: list[BinaryIO]) -> Iterator[bytes]:
    """The verified data of a regular file, chunk by chunk, from open blob files.

    A chunk repeated back to back (the holes of a sparse file) is read and verified once.
    """
    last: tuple[ChunkRef, bytes] | None = None
    for ref in node.chunks:
        if last is None or last[0] != ref:
            last = (ref, read_chunk(files[ref.blob_index], blobs[ref.blob_index], ref))
        yield last[1]


def unpack_tree(tree: Tree, blob_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Materialise *tree* under *dest*: content, modes, owners, times, xattrs, links, devices."""
    base = os.fsencode(dest)
    os.makedirs(base, exist_ok=True)
    made: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Inode]] = []
    with ExitStack() as stack:
        files: list[BinaryIO] = [stack.enter_context(open(blob_path(Path(blob_dir), b), "rb")) for b in tree.blobs]
        for path, node in tree.walk():
            target = base + path if path != b"/" else base
            if id(node) in made:
                os.link(made[id(node)], target)
                continue
            _make(node, target, tree.blobs, files)
            if node.is_dir:
                dirs.append((target, node))
            else:
                made[id(node)] = target
                _set_attrs(node, target)
    for target, node in reversed(dirs):  # children first, so directory mtimes stick
        _set_attrs(node, target)


def _make(node: Inode, target: bytes, blobs: list[BlobInfo], files: list[BinaryIO]) -> None:
    fmt = stat.S_IFMT(node.mode)
    if fmt == stat.S_IFDIR:
        os.makedirs(target, exist_ok=True)
    elif fmt == stat.S_IFREG:
        with open(target, "wb") as out:
            for data in file_contents(node, blobs, files):
                if data.count(0) == len(data):
                    out.seek(len(data), os.SEEK_CUR)
                else:
                    out.write(data)
            out.truncate(node.size)
    elif fmt == stat.S_IFLNK:
        os.symlink(node.target, target)
    else:
        os.mknod(target, fmt | 0o600, node.rdev)


def _set_attrs(node: Inode, target: bytes) -> None:
    os.chown(target, node.uid, node.gid, follow_symlinks=False)
    for key, value in node.xattrs.items():
        os.setxattr(target, key, value, follow_symlinks=False)
    if not stat.S_ISLNK(node.mode):
        os.chmod(target, stat.S_IMODE(node.mode))
    ns = node.mtime * 10**9 + node.mtime_nsec
    os.utime(target, ns=(ns, ns), follow_symlinks=False)
