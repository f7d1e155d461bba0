"""Helpers shared by the benchmarks: timing child processes and locating inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def rootfs() -> Path:
    """The Debian root used as a realistic image (made by `make rootfs`)."""
    path = Path(os.environ.get("LAZYFS_BENCH_ROOTFS", "/var/cache/lazyfs/rootfs-bookworm"))
    if not (path / "usr" / "bin" / "python3").exists():
        raise SystemExit(f"no Debian rootfs at {path}: run `make rootfs` first")
    return path


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under *path*."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total
