"""Running `lazyfs mount` as a user does, with cleanup that survives failing tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


class Lazyfs:
    """The CLI with a private run dir and cache dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.env = {**os.environ, "LAZYFS_RUN_DIR": str(root / "run")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], capture_output=True, text=True,
                              env=self.env, timeout=180)
        if check:
            assert proc.returncode == 0, f"lazyfs {args[0]} failed: {proc.stderr}"
        return proc

    @contextmanager
    def mount(self, source: str | Path, mountpoint: Path, *extra: str) -> Iterator[Path]:
        """A mount that is always taken down, falling back to a lazy unmount."""
        if os.geteuid() != 0 or not Path("/dev/fuse").exists():
            pytest.skip("FUSE mounts need root and /dev/fuse")
        mountpoint.mkdir(parents=True, exist_ok=True)
        self("mount", str(source), str(mountpoint), "--cache-dir", str(self.cache), *extra)
        try:
            yield mountpoint
        finally:
            if self("umount", str(mountpoint), check=False).returncode or leftovers(self.root):
                for point in mounts_under(self.root):
                    subprocess.run(["umount", "-l", point], check=False)
                for device in loops_under(self.root):
                    subprocess.run(["losetup", "-d", device], check=False)

    def status(self) -> list[dict[str, Any]]:
        """`lazyfs status --json`."""
        result: list[dict[str, Any]] = json.loads(self("status", "--json").stdout)
        return result

    def mount_status(self, mountpoint: Path) -> dict[str, Any]:
        """The status entry of one mount."""
        return next(m for m in self.status() if m.get("mountpoint") == str(mountpoint.resolve()))


def mount_table(root: Path) -> dict[str, str]:
    """Mountpoints below *root* and their filesystem types."""
    prefix = os.path.realpath(root) + "/"
    fields = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    return {f[1]: f[2] for f in fields if f[1].startswith(prefix)}


def mounts_under(root: Path) -> list[str]:
    """Mountpoints below *root*, deepest first so EROFS goes before the FUSE devices it reads."""
    return sorted(mount_table(root), key=lambda point: (not point.endswith("/mnt"), -point.count("/")))


def loops_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies below *root* (bootstraps and blob device files)."""
    prefix = os.path.realpath(root) + "/"
    return ["/dev/" + backing.parts[3] for backing in Path("/sys/block").glob("loop*/loop/backing_file")
            if backing.read_text().strip().startswith(prefix)]


def leftovers(root: Path, wait: float = 5.0) -> list[str]:
    """Mounts and loop devices of *root* still there after up to *wait* seconds (autoclear is quick)."""
    deadline = time.monotonic() + wait
    while (left := mounts_under(root) + loops_under(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
