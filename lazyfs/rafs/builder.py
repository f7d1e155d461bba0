"""``lazyfs build``: turn a directory or a layer tar into a bootstrap plus a data blob."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.rafs.blob import BlobWriter
from lazyfs.rafs.dirsource import build_tree_from_dir
from lazyfs.rafs.tarsource import build_tree_from_tar
from lazyfs.rafs.tree import DEFAULT_CHUNK_SIZE, BlobInfo, Tree
from lazyfs.rafs.writer import write_bootstrap


@dataclass(frozen=True)
class BuildOptions:
    """Settings of one build, with nydus-image's defaults."""

    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prefetch: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class BuildResult:
    """What a build produced."""

    tree: Tree
    bootstrap: bytes
    blob: BlobInfo | None  # None when the source has no file data
    blob_path: Path | None


def build_layer(source: str | os.PathLike[str], blob_dir: str | os.PathLike[str],
                options: BuildOptions | None = None) -> BuildResult:
    """Build *source* (a directory or an uncompressed tar file) into ``blob_dir/<blob_id>`` and a bootstrap."""
    if os.path.isdir(source):
        return _build(lambda writer: build_tree_from_dir(source, writer), blob_dir, options or BuildOptions())
    with open(source, "rb") as stream:
        return build_from_tar_stream(stream, blob_dir, options)


def build_from_tar_stream(stream: IO[bytes], blob_dir: str | os.PathLike[str],
                          options: BuildOptions | None = None) -> BuildResult:
    """Build a layer from a tar read sequentially from *stream* (memory stays bounded)."""
    return _build(lambda writer: build_tree_from_tar(stream, writer), blob_dir, options or BuildOptions())


def _build(source: Callable[[BlobWriter], Tree], blob_dir: str | os.PathLike[str],
           options: BuildOptions) -> BuildResult:
    """Run *source* against a blob written to a temporary file, renamed to its id only when complete."""
    blob_dir = Path(blob_dir)
    blob_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".building-", dir=blob_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            writer = BlobWriter(out, compressor=options.compressor, digester=options.digester,
                                chunk_size=options.chunk_size)
            tree = source(writer)
            info = writer.finish()
        return _finish(tree, info, Path(tmp), blob_dir, options.prefetch)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finish(tree: Tree, info: BlobInfo, tmp: Path, blob_dir: Path, prefetch: Iterable[bytes]) -> BuildResult:
    tree.prefetch = list(prefetch)
    if info.chunk_count == 0:
        return BuildResult(tree, write_bootstrap(tree), None, None)
    tree.blobs = [info]
    bootstrap = write_bootstrap(tree)
    path = blob_dir / info.blob_id
    os.replace(tmp, path)
    return BuildResult(tree, bootstrap, info, path)


def read_prefetch_list(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """Absolute paths, one per line (blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_bytes().splitlines()
    return tuple(b"/" + line.strip().lstrip(b"/") for line in lines if line.strip() and not line.startswith(b"#"))
