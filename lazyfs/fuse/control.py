"""The CLI side of mounts: start a daemon in the background, unmount, and query status."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from lazyfs.errors import LazyfsError
from lazyfs.fuse.api import api_client
from lazyfs.fuse.records import MountRecord, find_record, folder_for, load_records

READY = b"ready\n"


class Standby:
    """A mount daemon process waiting for its arguments (:mod:`lazyfs.fuse.standby`): Python started
    and modules imported ahead of the mount."""

    def __init__(self, stderr: int | IO[bytes] = subprocess.DEVNULL) -> None:
        self._ready, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.fuse.standby", str(write_fd)], stdin=subprocess.PIPE,
                stdout=stderr, stderr=stderr, pass_fds=(write_fd,), start_new_session=True,
            )
        except BaseException:
            os.close(self._ready)
            raise
        finally:
            os.close(write_fd)

    def start(self, argv: list[str], log_path: Path, timeout: float) -> bytes:
        """Run ``lazyfs mount ARGV --foreground`` here; its ready message (empty if it died or timed out)."""
        assert self.proc.stdin is not None
        try:
            with self.proc.stdin:
                self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}).encode() + b"\n")
            return _read_ready(self._ready, timeout)
        except BrokenPipeError:  # it died waiting
            return b""
        finally:
            os.close(self._ready)

    def discard(self) -> None:
        """End a standby that will not be used (it exits at the end of its input)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        os.close(self._ready)
        self.proc.wait()


def spawn_daemon(argv: list[str], mountpoint: Path, timeout: float = 120.0, standby: Standby | None = None
                 ) -> None:
    """Run ``lazyfs mount ARGV --foreground`` detached, in *standby* if it is still waiting; return once
    the daemon reports the mount usable."""
    folder = folder_for(mountpoint)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "daemon.log"
    if standby is None or standby.proc.poll() is not None:
        if standby is not None:
            standby.discard()
        with open(log_path, "ab") as log:
            standby = Standby(log)
    message = standby.start(argv, log_path, timeout)
    if message != READY:
        if standby.proc.poll() is None:
            standby.proc.kill()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise LazyfsError("mount daemon failed to start:\n  " + "\n  ".join(tail))


def _read_ready(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data
        chunk = os.read(fd, 64)
        if not chunk:
            return data
        data += chunk
    return data


def signal_ready(fd: int) -> None:
    """Tell the waiting ``lazyfs mount`` that the mount is usable."""
    os.write(fd, READY)
    os.close(fd)


def status() -> list[dict[str, Any]]:
    """The status of every live mount (stale records are reported as dead)."""
    out = []
    for record in load_records():
        if not record.alive():
            out.append({"mountpoint": record.mountpoint, "source": record.source, "state": "dead"})
            continue
        try:
            with api_client(record.socket, timeout=5) as client:
                out.append({"state": "running", **client.get("/api/v1/status").json()})
        except httpx.HTTPError as exc:
            out.append({"mountpoint": record.mountpoint, "source": record.source, "state": f"unreachable: {exc}"})
    return out


def trace(mountpoint: Path) -> list[str]:
    """The files opened so far on the fuse mount at *mountpoint*, in first-open order."""
    record = find_record(mountpoint)
    if record is None or not record.alive():
        raise LazyfsError(f"no running lazyfs mount at {mountpoint}")
    try:
        with api_client(record.socket, timeout=30) as client:
            reply = client.get("/api/v1/trace")
    except httpx.HTTPError as exc:
        raise LazyfsError(f"mount daemon of {mountpoint} does not answer: {exc}") from None
    if reply.status_code != 200:
        raise LazyfsError(reply.json().get("error", f"HTTP {reply.status_code}"))
    return list(reply.json()["files"])


def unmount(mountpoint: Path, timeout: float = 30.0) -> None:
    """Stop the daemon serving *mountpoint* (through its API, then signals) and make sure it is unmounted."""
    record = find_record(mountpoint)
    if record is None and not _is_mounted(mountpoint):
        raise LazyfsError(f"no lazyfs mount at {mountpoint}")
    if record is not None and record.alive():
        _stop(record, timeout)
    devices = folder_for(mountpoint) / "devices"  # erofs mode: the blob device files of a daemon that died
    for point in (mountpoint, devices):  # the EROFS mount first: its loops detach when it goes
        if _is_mounted(point):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    if _is_mounted(mountpoint):
        raise LazyfsError(f"{mountpoint} is still mounted")


def _stop(record: MountRecord, timeout: float) -> None:
    try:
        with api_client(record.socket, timeout=5) as client:
            client.post("/api/v1/shutdown")
    except httpx.HTTPError:
        os.kill(record.pid, 15)
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if record.alive():
        os.kill(record.pid, 9)


def _mounts() -> list[tuple[str, str]]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [(fields[1].replace("\\040", " "), fields[2]) for fields in (line.split() for line in lines)]


def _is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    return any(point == target for point, _ in _mounts())
