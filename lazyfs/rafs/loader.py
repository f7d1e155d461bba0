"""Open any bootstrap lazyfs meets: RAFS v6 or v5, bare, inside a bootstrap layer, or inlined in a blob."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from lazyfs.errors import FormatError
from lazyfs.rafs.blob import MAX_BOOTSTRAP, extract_bootstrap
from lazyfs.rafs.reader import Bootstrap, detect_version
from lazyfs.rafs.tree import Tree
from lazyfs.rafs.v5 import read_v5

BOOTSTRAP_MEMBER = "image/image.boot"


def bootstrap_from_layer(data: bytes) -> bytes:
    """``image/image.boot`` from a Nydus bootstrap layer (tar, optionally gzip-compressed)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise FormatError(f"bootstrap layer is not valid gzip: {exc}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            member = tar.getmember(BOOTSTRAP_MEMBER)
            if not member.isfile() or member.size > MAX_BOOTSTRAP:
                raise FormatError(f"{BOOTSTRAP_MEMBER} in the bootstrap layer is not a sane regular file")
            f = tar.extractfile(member)
            assert f is not None
            return f.read()
    except KeyError:
        raise FormatError(f"bootstrap layer has no {BOOTSTRAP_MEMBER}") from None
    except tarfile.TarError as exc:
        raise FormatError(f"bootstrap layer is not a valid tar: {exc}") from None


def read_bootstrap_bytes(path: str | os.PathLike[str]) -> bytes:
    """The raw bootstrap in *path*: a bootstrap file, a bootstrap layer, or a blob with one inlined."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(2048)
        try:
            detect_version(head)
        except FormatError:
            pass
        else:
            if size > MAX_BOOTSTRAP:
                raise FormatError(f"{path}: bootstrap of {size} bytes is too large")
            return head + f.read()
        if head[:2] == b"\x1f\x8b" or (head[257:262] == b"ustar" and head[:6] != b"\0" * 6):
            if size > MAX_BOOTSTRAP:
                raise FormatError(f"{path}: bootstrap layer of {size} bytes is too large")
            return bootstrap_from_layer(head + f.read())
        try:
            return extract_bootstrap(f, size)
        except FormatError as exc:
            raise FormatError(f"{path}: not a Nydus bootstrap, bootstrap layer, or blob with an inlined "
                              f"bootstrap ({exc})") from None


def load_tree(path: str | os.PathLike[str]) -> Tree:
    """The whole tree of the bootstrap found in *path* (see :func:`read_bootstrap_bytes`)."""
    data = read_bootstrap_bytes(path)
    if detect_version(data) == 5:
        return read_v5(data, str(path))
    return Bootstrap(data, str(path)).to_tree()
