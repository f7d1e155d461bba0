"""The seam between the snapshots service and how snapshots are materialised.

The service owns metadata and directories; a :class:`Backend` decides what a snapshot's mounts are and
what its usage is at commit, and releases what it holds on removal. :class:`snapshotter.overlay.
OverlayBackend` is the plain overlayfs implementation; a remote (lazy) backend wraps or replaces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from snapshotter.store import Snapshot, Usage


@dataclasses.dataclass(frozen=True)
class Mount:
    """One mount as containerd performs it (``target`` is not sent: containerd 1.6 drops it)."""

    type: str
    source: str
    options: tuple[str, ...]


class Backend(Protocol):
    """Hooks the service calls; errors derived from :class:`snapshotter.errors.SnapshotError` reach the client.

    *parents* are the snapshot's ancestors, nearest first. The service has created the snapshot's record
    and its ``fs`` (and, if active, ``work``) directory before :meth:`prepare`.
    """

    def prepare(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """Mounts for a new active or view snapshot (labels in ``snapshot.labels``).

        Runs outside the metadata lock. If it raises, the service deletes the snapshot again unless its
        key is gone (a remote backend may commit it under its target, then raise AlreadyExists).
        """
        ...

    def mounts(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """Mounts of an existing active or view snapshot: the same answer :meth:`prepare` gave."""
        ...

    def commit(self, snapshot: Snapshot) -> Usage:
        """Called before active *snapshot* is committed (outside the lock); returns the usage to record."""
        ...

    def committed(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> None:
        """Called once *snapshot* is committed (outside the lock): a chance to get ready for its children."""
        ...

    def remove(self, snapshot: Snapshot) -> None:
        """Release what the backend holds for *snapshot* (mounts, daemons) before its directory is deleted.

        Runs inside the metadata transaction that removes the record (so it must not open another);
        raising keeps the snapshot.
        """
        ...
