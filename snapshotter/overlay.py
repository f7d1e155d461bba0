"""Snapshots on disk (``ROOT/snapshots/<id>/{fs,work}``) and the plain overlayfs backend.

Mounts follow containerd's overlay snapshotter: a bind mount when there is no parent (or for a view of
a single layer), otherwise an overlay whose ``lowerdir`` lists the parents' ``fs`` directories nearest
first. Directories leave through ``ROOT/trash``: renamed there under the metadata lock, then deleted,
detaching any mount found below them first so nothing is ever deleted through a live mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

from snapshotter.backend import Mount
from snapshotter.log import fields, log
from snapshotter.store import Kind, Snapshot, Usage

_MNT_DETACH = 2
_OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Layout:
    """Where snapshot directories live under the snapshotter's root."""

    def __init__(self, root: Path) -> None:
        self.snapshots = root / "snapshots"
        self.trash = root / "trash"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(exist_ok=True)

    def dir(self, snapshot_id: int) -> Path:
        """The directory of snapshot *snapshot_id*."""
        return self.snapshots / str(snapshot_id)

    def fs(self, snapshot_id: int) -> Path:
        """The snapshot's own files (overlay upperdir, or the bind-mounted tree)."""
        return self.dir(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        """The overlay workdir of an active snapshot."""
        return self.dir(snapshot_id) / "work"

    def create(self, snapshot: Snapshot) -> None:
        """Make the snapshot's directories, replacing a stale directory left with the same id."""
        self.discard(snapshot.id)
        _mkdir(self.dir(snapshot.id), 0o700)
        _mkdir(self.fs(snapshot.id), 0o755)
        if snapshot.kind == Kind.ACTIVE:
            _mkdir(self.work(snapshot.id), 0o711)

    def discard(self, snapshot_id: int) -> None:
        """Move the snapshot's directory (if any) into the trash, detaching mounts below it."""
        path = self.dir(snapshot_id)
        if not path.exists():
            return
        detach_mounts_under(path)
        path.rename(self.trash / f"{snapshot_id}-{uuid.uuid4().hex}")

    def orphans(self, known: set[int]) -> list[int]:
        """Ids of snapshot directories that have no metadata."""
        return [int(p.name) for p in self.snapshots.iterdir() if p.name.isdigit() and int(p.name) not in known]

    def purge(self) -> None:
        """Delete everything in the trash; what cannot be deleted now is logged and left for the next purge."""
        try:
            detach_mounts_under(self.trash)
            for entry in self.trash.iterdir():
                shutil.rmtree(entry, onerror=_ignore_missing)
        except OSError as exc:
            log.warning("%s", fields(event="purge-failed", path=self.trash, error=exc))


class OverlayBackend:
    """Snapshots as plain overlayfs layers in :class:`Layout` directories."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._extra = ("index=off",) if _OVERLAY_INDEX_PARAM.exists() else ()

    def prepare(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """Mounts of the new snapshot."""
        return self.mounts(snapshot, parents)

    def mounts(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """Bind mount without parents or for a one-layer view; overlay otherwise."""
        layout = self.layout
        if not parents:
            mode = "ro" if snapshot.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(layout.fs(snapshot.id)), (mode, "rbind"))]
        lowerdir = "lowerdir=" + ":".join(str(layout.fs(p.id)) for p in parents)
        if snapshot.kind == Kind.VIEW:
            if len(parents) == 1:
                return [Mount("bind", str(layout.fs(parents[0].id)), ("ro", "rbind"))]
            return [Mount("overlay", "overlay", (*self._extra, lowerdir))]
        upper = (f"workdir={layout.work(snapshot.id)}", f"upperdir={layout.fs(snapshot.id)}")
        return [Mount("overlay", "overlay", (*self._extra, *upper, lowerdir))]

    def commit(self, snapshot: Snapshot) -> Usage:
        """The disk usage of the snapshot's own files."""
        return disk_usage(self.layout.fs(snapshot.id))

    def committed(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> None:
        """Nothing to get ready: children mount the committed directory as it is."""

    def remove(self, snapshot: Snapshot) -> None:
        """Nothing to release: the service deletes the directory."""


def disk_usage(path: Path) -> Usage:
    """Allocated bytes and inodes under *path* (itself included), hard links once, other filesystems skipped."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return Usage()
    seen = {top.st_ino}
    size = top.st_blocks * 512
    pending = [path] if stat.S_ISDIR(top.st_mode) else []
    while pending:
        for info, child in _children(pending.pop()):
            if info.st_dev != top.st_dev or info.st_ino in seen:
                continue
            seen.add(info.st_ino)
            size += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                pending.append(child)
    return Usage(size, len(seen))


def _children(directory: Path) -> list[tuple[os.stat_result, Path]]:
    """lstat results of the entries of *directory*, skipping whatever vanishes meanwhile."""
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat(follow_symlinks=False), Path(entry.path)))
    except FileNotFoundError:
        pass
    return found


def mountpoints_under(path: Path) -> list[Path]:
    """Mount points at or below *path*, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def detach_mounts_under(path: Path) -> None:
    """Lazily unmount (MNT_DETACH) every mount at or below *path*."""
    for point in mountpoints_under(path):
        if _libc.umount2(os.fsencode(point), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):  # already gone
                raise OSError(code, f"cannot unmount {point}: {os.strerror(code)}")


def _mkdir(path: Path, mode: int) -> None:
    """A new directory with exactly *mode*, whatever the umask."""
    path.mkdir()
    path.chmod(mode)


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space) decoded."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def _ignore_missing(function: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
