"""Helpers shared by the benchmarks: timing child processes, locating inputs, dropping caches and
running `lazyfs mount`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAZYFS = [sys.executable, "-m", "lazyfs.cli"]


@dataclass(frozen=True)
class Run:
    """Wall time and peak resident memory of one child process."""

    seconds: float
    peak_rss_mb: float


def run(cmd: list[str] | str, *, shell: bool = False) -> Run:
    """Run *cmd* to completion, failing loudly, and measure it.

    Peak RSS comes from GNU time: a child forked straight from this (large) process would report
    this process's RSS as its own high-water mark, since Linux carries it across exec.
    """
    argv = ["/bin/sh", "-c", cmd] if shell else cmd
    assert isinstance(argv, list)
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", report.name, *argv], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"benchmark step failed: {cmd}")
        return Run(elapsed, int(report.read().split()[-1]) / 1024)


def _cached_root(variable: str, default: str, program: str, target: str) -> Path:
    """The Debian root named by environment *variable* (else *default*), checked to hold *program*."""
    path = Path(os.environ.get(variable, default))
    if not (path / program).exists():
        raise SystemExit(f"no Debian rootfs with /{program} at {path}: run `make {target}` first")
    return path


def rootfs() -> Path:
    """The Debian root with python3 used as a realistic image (made by `make rootfs`)."""
    return _cached_root("LAZYFS_BENCH_ROOTFS", "/var/cache/lazyfs/rootfs-bookworm", "usr/bin/python3", "rootfs")


def nginx_rootfs() -> Path:
    """The Debian root with nginx, for the web-server image (made by `make rootfs-nginx`)."""
    return _cached_root("LAZYFS_BENCH_NGINX_ROOTFS", "/var/cache/lazyfs/rootfs-bookworm-nginx", "usr/sbin/nginx",
                        "rootfs-nginx")


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under *path*."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def drop_caches() -> None:
    """Write back dirty data, then drop the kernel's page, dentry and inode caches (root only)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class MountError(RuntimeError):
    """`lazyfs mount` failed; the message holds its error output."""


@contextlib.contextmanager
def lazyfs_mount(source: str | Path, mountpoint: Path, *options: str) -> Iterator[float]:
    """`lazyfs mount SOURCE MOUNTPOINT OPTIONS...`; yields the seconds until it returned (mount usable).

    The mount is always taken down on exit, with ``umount -l`` when `lazyfs umount` fails. Set
    ``LAZYFS_RUN_DIR`` first so that the daemons register in a private run dir.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([*LAZYFS, "mount", str(source), str(mountpoint), *options], cwd=ROOT,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            raise MountError(proc.stderr.strip() or f"lazyfs mount exited with {proc.returncode}")
        yield elapsed
    finally:
        umount = subprocess.run([*LAZYFS, "umount", str(mountpoint)], cwd=ROOT, capture_output=True)
        if umount.returncode != 0 and os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def lazyfs_status(mountpoint: Path) -> dict[str, Any]:
    """The `lazyfs status --json` entry of the mount at *mountpoint*."""
    out = subprocess.run([*LAZYFS, "status", "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wanted = str(mountpoint.resolve())
    entry: dict[str, Any] = next(m for m in json.loads(out) if m["mountpoint"] == wanted)
    return entry


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, for ``--png`` charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
