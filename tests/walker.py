"""A tree walker that records everything an image must preserve, for comparing two trees."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """What is compared for one path."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    size: int
    content: str  # sha256 of file data, symlink target, or ""
    rdev: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    link_group: bytes  # first path of the hardlink group (files only)


def snapshot(root: str | bytes, *, dir_mtimes: bool = True, xattrs: bool = True) -> dict[bytes, Entry]:
    """Map every path under *root* (relative, bytes) to its :class:`Entry`."""
    base = os.fsencode(root)
    out: dict[bytes, Entry] = {}
    groups: dict[tuple[int, int], bytes] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in [b"", *sorted(dirnames + filenames)] if dirpath == base else sorted(dirnames + filenames):
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            content = ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).hex()
            group = b""
            if not stat.S_ISDIR(st.st_mode):
                group = groups.setdefault((st.st_dev, st.st_ino), rel)
            attrs: tuple[tuple[bytes, bytes], ...] = ()
            if xattrs:
                names = os.listxattr(path, follow_symlinks=False)
                attrs = tuple(sorted((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names))
            is_dir = stat.S_ISDIR(st.st_mode)
            out[rel] = Entry(
                st.st_mode, st.st_uid, st.st_gid,
                None if is_dir and not dir_mtimes else st.st_mtime_ns,
                0 if is_dir else st.st_size, content,
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0, attrs, group,
            )
    return out


def diff(a: dict[bytes, Entry], b: dict[bytes, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty when identical)."""
    problems = [f"only in first: {p!r}" for p in sorted(a.keys() - b.keys())]
    problems += [f"only in second: {p!r}" for p in sorted(b.keys() - a.keys())]
    for path in sorted(a.keys() & b.keys()):
        if a[path] != b[path]:
            problems.append(f"{path!r}: {a[path]} != {b[path]}")
    return problems
