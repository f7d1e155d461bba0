"""Metadata walk speed: lookup + getattr of every entry of a >= 50 000-file bootstrap through our
reader, against the same walk on a kernel EROFS mount of the same bootstrap (measured in this run).

Both walks are done cold (fresh reader; kernel caches dropped) and warm. Target: <= 3x the kernel.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lazyfs.rafs.builder import build_layer
from lazyfs.rafs.export import export_blob_data
from lazyfs.rafs.reader import Bootstrap
from tests.kernel import erofs_mount


def make_tree(root: Path, dirs: int, files_per_dir: int) -> int:
    """Directories of small files; returns the number of entries."""
    for d in range(dirs):
        sub = root / f"dir-{d:04d}"
        sub.mkdir(parents=True)
        for f in range(files_per_dir):
            (sub / f"file-{f:05d}.txt").write_bytes(b"x" * (f % 7))
    return dirs * (files_per_dir + 1)


def walk_reader(boot: Bootstrap) -> int:
    """Readdir every directory, then lookup + getattr each entry, as a FUSE server would."""
    count, stack = 0, [boot.root_nid]
    while stack:
        ino = boot.inode(stack.pop())
        for name, _, _ in boot.readdir(ino):
            if name in (b".", b".."):
                continue
            nid = boot.lookup(ino, name)
            assert nid is not None
            info = boot.inode(nid)
            count += 1
            if info.is_dir:
                stack.append(nid)
    return count


def walk_kernel(root: Path) -> int:
    """Readdir every directory, then lstat each entry (lookup + getattr in the kernel)."""
    count, stack = 0, [os.fsencode(root)]
    while stack:
        path = stack.pop()
        for name in os.listdir(path):
            child = path + b"/" + name
            st = os.lstat(child)
            count += 1
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    return count


def drop_caches() -> None:
    """Drop the kernel's page, dentry and inode caches (root only)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[..., int], *args: object) -> tuple[float, int]:
    """Seconds taken by ``fn(*args)`` and its result."""
    start = time.perf_counter()
    count = fn(*args)
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dirs", type=int, default=250)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-meta-") as tmp:
        work = Path(tmp)
        entries = make_tree(work / "src", args.dirs, args.files)
        result = build_layer(work / "src", work / "blobs")
        boot_path = work / "boot"
        boot_path.write_bytes(result.bootstrap)
        tree = Bootstrap.open(boot_path).to_tree()
        devices = export_blob_data(tree, work / "blobs", work / "export")
        with erofs_mount(boot_path, devices, work / "mnt") as mnt:
            drop_caches()
            k_cold, kn = timed(walk_kernel, mnt)
            k_warm, _ = timed(walk_kernel, mnt)
            drop_caches()
            boot = Bootstrap.open(boot_path)
            o_cold, on = timed(walk_reader, boot)
            o_warm, _ = timed(walk_reader, boot)
        assert kn == on == entries, (kn, on, entries)
        print(f"metadata walk of {entries} entries (bootstrap {len(result.bootstrap) / 1e6:.1f} MB)")
        print(f"  cold: lazyfs reader {o_cold:.3f} s, kernel EROFS {k_cold:.3f} s, ratio {o_cold / k_cold:.2f}x")
        print(f"  warm: lazyfs reader {o_warm:.3f} s, kernel EROFS {k_warm:.3f} s, ratio {o_warm / k_warm:.2f}x")
        print("  target: <= 3x the kernel's time")


if __name__ == "__main__":
    main()
