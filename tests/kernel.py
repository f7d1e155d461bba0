"""Kernel EROFS mounts used as an independent oracle; always torn down, even when a test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def require_erofs() -> None:
    """Skip unless this machine can mount EROFS images (root, erofs in the kernel, losetup)."""
    if os.geteuid() != 0:
        pytest.skip("kernel EROFS mounts need root")
    if "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("kernel has no EROFS support")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """A read-only loop device over *path*."""
    dev = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def erofs_mount(bootstrap: Path, devices: Sequence[Path], mountpoint: Path) -> Iterator[Path]:
    """Mount *bootstrap* with the kernel EROFS driver, one loop device per blob.data file."""
    require_erofs()
    mountpoint.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        loops = [stack.enter_context(loop_device(d)) for d in devices]
        opts = ",".join(["ro", *(f"device={dev}" for dev in loops)])
        subprocess.run(["mount", "-t", "erofs", "-o", opts, str(bootstrap), str(mountpoint)], check=True,
                       capture_output=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
