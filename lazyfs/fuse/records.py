"""The run directory where mount daemons register: one JSON record and one API socket per mount."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/lazyfs")
DEFAULT_CACHE_DIR = Path("/var/lib/lazyfs/cache")


def run_dir() -> Path:
    """``$LAZYFS_RUN_DIR`` or /run/lazyfs."""
    return Path(os.environ.get("LAZYFS_RUN_DIR", DEFAULT_RUN_DIR))


def mount_id(mountpoint: Path) -> str:
    """A stable id for a mountpoint."""
    return hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]


@dataclass(frozen=True)
class MountRecord:
    """What ``lazyfs status`` and ``lazyfs umount`` need to find a mount daemon."""

    id: str
    mountpoint: str
    source: str
    mode: str
    pid: int
    started: float

    @property
    def folder(self) -> Path:
        """The daemon's private run folder (API socket, log, erofs devices)."""
        return run_dir() / "mounts" / self.id

    @property
    def socket(self) -> Path:
        """The daemon's API socket."""
        return self.folder / "api.sock"

    def save(self) -> None:
        """Write the record atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "mount.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.folder / "mount.json")

    def alive(self) -> bool:
        """Whether the daemon process still runs (a zombie awaiting its reaper does not)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def folder_for(mountpoint: Path) -> Path:
    """The run folder a mount at *mountpoint* uses."""
    return run_dir() / "mounts" / mount_id(mountpoint)


def load_records() -> list[MountRecord]:
    """Every registered mount (stale ones included; check :meth:`MountRecord.alive`)."""
    out = []
    for path in sorted((run_dir() / "mounts").glob("*/mount.json")):
        try:
            out.append(MountRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


def find_record(mountpoint: Path) -> MountRecord | None:
    """The record of the mount at *mountpoint*, if any."""
    wanted = mount_id(mountpoint)
    return next((r for r in load_records() if r.id == wanted), None)
