"""Source trees for round-trip tests: every kind of entry and attribute an image must carry."""

from __future__ import annotations

import os
from pathlib import Path

CAPABILITY = bytes.fromhex("0100000220000000000000000000000000000000")


def make_rich_tree(root: Path, *, huge_sparse: bool = True, many: int = 10_001) -> Path:
    """Populate *root* with files, links, devices, xattrs, odd names, sparse and > 4 GiB files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_bytes(b"hello\n")
    os.link(root / "a.txt", root / "hard.txt")
    (root / "sym").symlink_to("a.txt")
    (root / "longsym").symlink_to("/nonexistent/" + "x" * 3000)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (root / "dup1").write_bytes(b"z" * 70000)
    (root / "dup2").write_bytes(b"z" * 70000)
    (root / "empty").touch()
    os.mkfifo(root / "fifo")
    os.mknod(root / "cdev", 0o20644, os.makedev(1, 3))
    os.mknod(root / "bdev", 0o60600, os.makedev(259, 70000))
    os.setxattr(root / "a.txt", b"user.foo", b"bar")
    os.setxattr(root / "big.bin", b"security.capability", CAPABILITY)
    os.chmod(root / "big.bin", 0o4755)
    (root / "sub" / "deep").mkdir(parents=True)
    os.setxattr(root / "sub", b"trusted.x", b"\x00\x01\xff")
    os.chmod(root / "sub", 0o1777)
    os.chmod(root / "sub" / "deep", 0o2750)
    os.chown(root / "sub" / "deep", 100000, 200000)
    (root / "sub" / "deep" / "f").write_bytes(b"deep")
    os.utime(root / "sub" / "deep" / "f", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    with open(os.fsencode(root) + b"/" + b"n" * 255, "wb") as f:
        f.write(b"long name")
    with open(os.fsencode(root) + b"/\xff\xfe-latin1", "wb") as f:
        f.write(b"not utf-8")
    with open(root / "sparse", "wb") as f:
        f.truncate((5 << 30) if huge_sparse else (9 << 20))
        f.seek(-5, os.SEEK_END)
        f.write(b"tail\n")
    many_dir = root / "many"
    many_dir.mkdir()
    for i in range(many):
        (many_dir / f"entry-{i:06d}").touch()
    return root
