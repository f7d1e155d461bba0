"""Running `lazyfs mount` as a user does, with cleanup that survives failing tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
            if self("umount", str(mountpoint), check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)

    def status(self) -> list[dict[str, Any]]:
        """`lazyfs status --json`."""
        result: list[dict[str, Any]] = json.loads(self("status", "--json").stdout)
        return result

    def mount_status(self, mountpoint: Path) -> dict[str, Any]:
        """The status entry of one mount."""
        return next(m for m in self.status() if m.get("mountpoint") == str(mountpoint.resolve()))
