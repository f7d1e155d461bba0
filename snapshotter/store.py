"""Snapshot metadata in SQLite (``ROOT/metadata.db``), changed only inside transactions.

Keys and committed names share one namespace of opaque strings (containerd's look like
``k8s.io/42/extract-123 sha256:…``, spaces included); each snapshot also has a numeric id, never reused,
that names its directory. The rules are containerd's: parents must be committed, Commit renames an
active key to a committed name (keeping the id) and replaces its labels, and a snapshot with children
cannot be removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

MAX_LABEL_BYTES = 4096
"""containerd's limit on one label's key plus value (labels/validate.go)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
        parent_id INTEGER REFERENCES snapshots(id),
        labels TEXT NOT NULL,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        inodes INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id)",
)
_COLUMNS = (
    "s.id, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.labels, s.created_ns, s.updated_ns, s.size, s.inodes"
)
_SELECT = f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
_SELECT_PARENTS = (
    "WITH RECURSIVE chain(id, depth) AS ("
    " SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL"
    " UNION ALL SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id"
    " WHERE s.parent_id IS NOT NULL) "
    f"SELECT {_COLUMNS} FROM chain c JOIN snapshots s ON s.id = c.id LEFT JOIN snapshots p ON p.id = s.parent_id "
    "ORDER BY c.depth"
)


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in the protocol's ``Kind`` enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclasses.dataclass(frozen=True)
class Usage:
    """Disk usage of a snapshot's own files."""

    size: int = 0
    inodes: int = 0


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot's metadata; ``parent`` is the parent's key ("" for none), times are ns since the epoch."""

    id: int
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    labels: Mapping[str, str]
    created_ns: int
    updated_ns: int
    usage: Usage

    @classmethod
    def from_row(cls, row: tuple[int, str, int, int | None, str, str, int, int, int, int]) -> Snapshot:
        id_, key, kind, parent_id, parent, labels, created, updated, size, inodes = row
        return cls(id_, key, Kind(kind), parent_id, parent, json.loads(labels), created, updated, Usage(size, inodes))


def validate_labels(labels: Mapping[str, str]) -> None:
    """InvalidArgument when one label's key plus value exceeds :data:`MAX_LABEL_BYTES`."""
    for name, value in labels.items():
        if len(name.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {name[:64]!r}: key and value exceed {MAX_LABEL_BYTES} bytes")


def _require_key(what: str, key: str) -> None:
    if not key:
        raise InvalidArgument(f"{what} must not be empty")


class Transaction:
    """Reads and writes inside one SQLite transaction (see :meth:`Store.transaction`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, key: str) -> Snapshot:
        """The snapshot with *key*; NotFound if there is none."""
        row = self._db.execute(_SELECT + "WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return Snapshot.from_row(row)

    def find(self, key: str) -> Snapshot | None:
        """The snapshot with *key*, or None."""
        with contextlib.suppress(NotFound):
            return self.get(key)
        return None

    def parents(self, snapshot: Snapshot) -> list[Snapshot]:
        """The ancestors of *snapshot*, nearest first."""
        return [Snapshot.from_row(row) for row in self._db.execute(_SELECT_PARENTS, (snapshot.id,))]

    def all(self) -> list[Snapshot]:
        """Every snapshot, in id order."""
        return [Snapshot.from_row(row) for row in self._db.execute(_SELECT + "ORDER BY s.id")]

    def ids(self) -> set[int]:
        """The ids of every snapshot."""
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        """Record a new active or view snapshot of *parent* ("" for none)."""
        _require_key("key", key)
        validate_labels(labels)
        if self.find(key) is not None:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        parent_id = None
        if parent:
            base = self.find(parent)
            if base is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if base.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = base.id
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO snapshots (key, kind, parent_id, labels, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, json.dumps(dict(labels)), now, now),
        )
        return self.get(key)

    def commit(self, key: str, name: str, labels: Mapping[str, str], usage: Usage) -> Snapshot:
        """Turn active snapshot *key* into committed snapshot *name* with *labels* and *usage*."""
        _require_key("name", name)
        validate_labels(labels)
        active = self.get(key)
        if active.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if self.find(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ?"
            " WHERE id = ?",
            (name, int(Kind.COMMITTED), json.dumps(dict(labels)), now, now, usage.size, usage.inodes, active.id),
        )
        return self.get(name)

    def set_labels(self, key: str, labels: Mapping[str, str]) -> Snapshot:
        """Replace the labels of *key*."""
        validate_labels(labels)
        snapshot = self.get(key)
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(dict(labels)), time.time_ns(), snapshot.id),
        )
        return self.get(key)

    def remove(self, key: str) -> Snapshot:
        """Delete the record of *key*; FailedPrecondition if it has children."""
        snapshot = self.get(key)
        if self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot.id,)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot.id,))
        return snapshot


class Store:
    """The metadata database; one writer at a time, shared by the server's threads."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self.transaction():
            for statement in _SCHEMA:
                self._db.execute(statement)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, key: str) -> Snapshot:
        """The snapshot with *key*; NotFound if there is none."""
        with self.transaction() as tx:
            return tx.get(key)
