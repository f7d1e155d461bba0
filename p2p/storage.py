"""A peer's piece store, laid out as Dragonfly's client does (../shared/docs/dragonfly-protocol.md §2.2, §5.3).

One sparse content file per task at ``<data_dir>/content/tasks/<task_id[0:3]>/<task_id>``; task and piece
state in SQLite (WAL) at ``<data_dir>/metadata.db``. A piece's bytes are written before its row is committed,
so a recorded piece always has its bytes after a process crash. At open, piece rows reaching past the end of
their content file (a truncated or missing file) are dropped and a succeeded task that lost pieces is marked
failed; content files without a task row are removed. A power loss can still leave zeroed pages behind a
recorded piece: readers verify the ``crc32:`` digest. Used from one trio thread; only ``watch`` awaits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from p2p.direct_io import Bytes, open_direct, write_at
from p2p.pieces import piece_digest

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
_TASK_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{2,127}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, url TEXT NOT NULL, content_length INTEGER NOT NULL, piece_length INTEGER NOT NULL,
    state TEXT NOT NULL, download BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pieces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, number INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, digest TEXT NOT NULL, parent_id TEXT NOT NULL, traffic_type INTEGER NOT NULL,
    cost_ns INTEGER NOT NULL, created_at REAL NOT NULL, UNIQUE (task_id, number));
"""
_PIECE_COLUMNS = "number, offset, length, digest, parent_id, traffic_type, cost_ns, created_at"
_TASK_QUERY = """SELECT t.task_id, url, content_length, piece_length, state, download, t.created_at, updated_at,
    (SELECT COUNT(*) FROM pieces p WHERE p.task_id = t.task_id) FROM tasks t"""


class StorageError(Exception):
    """A storage operation that cannot be done; the message names the task and piece."""


@dataclass(frozen=True, slots=True)
class PieceInfo:
    """A finished piece."""

    number: int
    offset: int
    length: int
    digest: str
    parent_id: str
    traffic_type: int
    cost_ns: int
    created_at: float


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task's state; ``download`` is the serialized ``common.v2.Download`` it was created with."""

    task_id: str
    url: str
    content_length: int
    piece_length: int
    piece_count: int
    state: str
    download: bytes
    created_at: float
    updated_at: float
    finished_pieces: int

    def piece_span(self, number: int) -> tuple[int, int]:
        """``(offset, length)`` of piece *number*, or StorageError if the task has no such piece."""
        if not 0 <= number < self.piece_count:
            raise StorageError(f"task {self.task_id} has no piece {number} (it has {self.piece_count})")
        offset = number * self.piece_length
        return offset, min(self.piece_length, self.content_length - offset)


def _task_info(row: tuple[str, str, int, int, str, bytes, float, float, int]) -> TaskInfo:
    task_id, url, content_length, piece_length, state, download, created_at, updated_at, finished = row
    count = -(-content_length // piece_length)
    return TaskInfo(task_id, url, content_length, piece_length, count, state, bytes(download), created_at,
                    updated_at, finished)


class Storage:
    """Tasks, their pieces and content files under *data_dir*; one process at a time (an flock guards it)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._tasks_dir = data_dir / "content" / "tasks"
        self._tasks_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StorageError(f"storage {data_dir} is in use by another Storage") from None
        self._db = sqlite3.connect(data_dir / "metadata.db")  # `with self._db:` blocks are transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._fds: dict[str, int] = {}
        self._changed: dict[str, trio.Event] = {}
        self._closed = False
        self._recover()

    def close(self) -> None:
        """Close files and the database; watchers raise StorageError."""
        if self._closed:
            return
        self._closed = True
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for task_id in list(self._changed):
            self._notify(task_id)
        self._db.close()
        os.close(self._lock_fd)

    def content_path(self, task_id: str) -> Path:
        """Where a task's content file lives."""
        if not _TASK_ID.fullmatch(task_id):
            raise StorageError(f"invalid task id {task_id!r}")
        return self._tasks_dir / task_id[:3] / task_id

    def _recover(self) -> None:
        """Drop piece rows past the end of their content file; remove content files without a task."""
        known = set()
        for info in self.tasks():
            known.add(info.task_id)
            path = self.content_path(info.task_id)
            size = path.stat().st_size if path.exists() else 0
            with self._db:
                lost = self._db.execute("DELETE FROM pieces WHERE task_id = ? AND offset + length > ?",
                                        (info.task_id, size)).rowcount
                if lost and info.state == SUCCEEDED:
                    self._db.execute("UPDATE tasks SET state = ? WHERE task_id = ?", (FAILED, info.task_id))
        for path in self._tasks_dir.glob("*/*"):
            if path.name not in known and path.is_file():
                path.unlink()

    def _task_or_raise(self, task_id: str) -> TaskInfo:
        info = self.task(task_id)
        if info is None:
            raise StorageError(f"unknown task {task_id}")
        return info

    def ensure_task(self, task_id: str, *, url: str, content_length: int, piece_length: int,
                    download: bytes) -> TaskInfo:
        """Create a running task, or return the existing one (a failed one runs again, keeping its pieces)."""
        path = self.content_path(task_id)
        if content_length < 0 or piece_length <= 0:
            raise StorageError(f"task {task_id}: bad content length {content_length} or piece length {piece_length}")
        existing = self.task(task_id)
        if existing is not None:
            if (existing.content_length, existing.piece_length) != (content_length, piece_length):
                raise StorageError(
                    f"task {task_id} exists with content length {existing.content_length} and piece length "
                    f"{existing.piece_length}, not {content_length} and {piece_length}")
            if existing.state == FAILED:
                self._set_state(task_id, RUNNING)
                return self._task_or_raise(task_id)
            return existing
        now = time.time()
        with self._db:
            self._db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (task_id, url, content_length, piece_length, RUNNING, download, now, now))
        path.parent.mkdir(exist_ok=True)
        path.touch()
        return self._task_or_raise(task_id)

    def task(self, task_id: str) -> TaskInfo | None:
        """A task, or None if unknown."""
        row = self._db.execute(f"{_TASK_QUERY} WHERE t.task_id = ?", (task_id,)).fetchone()
        return None if row is None else _task_info(row)

    def tasks(self) -> list[TaskInfo]:
        """Every task, least recently updated first."""
        return [_task_info(row) for row in self._db.execute(f"{_TASK_QUERY} ORDER BY updated_at")]

    def pieces(self, task_id: str) -> dict[int, PieceInfo]:
        """The finished pieces of a task by number."""
        rows = self._db.execute(f"SELECT {_PIECE_COLUMNS} FROM pieces WHERE task_id = ?", (task_id,))
        return {row[0]: PieceInfo(*row) for row in rows}

    def piece(self, task_id: str, number: int) -> PieceInfo | None:
        """One finished piece, or None."""
        row = self._db.execute(f"SELECT {_PIECE_COLUMNS} FROM pieces WHERE task_id = ? AND number = ?",
                               (task_id, number)).fetchone()
        return None if row is None else PieceInfo(*row)

    def _fd(self, task_id: str) -> int:
        fd = self._fds.get(task_id)
        if fd is None:
            fd = self._fds[task_id] = os.open(self.content_path(task_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                              0o644)
        return fd

    def write_piece(self, task_id: str, number: int, data: bytes, *, parent_id: str, traffic_type: int,
                    cost_ns: int) -> PieceInfo:
        """Store a piece (bytes first, then its row) and wake watchers; a finished piece is left as it is."""
        offset = self._check_piece(task_id, number, data)
        existing = self.piece(task_id, number)
        if existing is not None:
            return existing
        write_at(self.content_path(task_id), data, offset)
        info = PieceInfo(number, offset, len(data), piece_digest(data), parent_id, traffic_type, cost_ns, time.time())
        return self._record(task_id, info)

    async def write_piece_async(self, task_id: str, number: int, data: Bytes, *, parent_id: str, traffic_type: int,
                                cost_ns: int, digest: str | None = None) -> PieceInfo:
        """``write_piece`` with the bytes written (and digested, unless the caller already checked them
        against *digest*) on a worker thread, so the trio loop runs on."""
        offset = self._check_piece(task_id, number, data)
        existing = self.piece(task_id, number)
        if existing is not None:
            return existing
        created = self._task_or_raise(task_id).created_at
        try:
            digest = await trio.to_thread.run_sync(_write_file, self.content_path(task_id), data, offset, digest)
        except FileNotFoundError:
            digest = ""
        now = self.task(task_id)
        if not digest or now is None or now.created_at != created:
            raise StorageError(f"task {task_id} was deleted while piece {number} was written")
        existing = self.piece(task_id, number)
        if existing is not None:
            return existing
        return self._record(task_id, PieceInfo(number, offset, len(data), digest, parent_id, traffic_type, cost_ns,
                                               time.time()))

    def _check_piece(self, task_id: str, number: int, data: Bytes) -> int:
        """The offset of piece *number*, or StorageError unless *data* has its length."""
        offset, length = self._task_or_raise(task_id).piece_span(number)
        if len(data) != length:
            raise StorageError(f"task {task_id} piece {number} is {length} bytes, got {len(data)}")
        return offset

    def _record(self, task_id: str, info: PieceInfo) -> PieceInfo:
        """Commit a piece whose bytes are on disk, and wake watchers."""
        with self._db:
            self._db.execute(f"INSERT INTO pieces ({_PIECE_COLUMNS}, task_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*_piece_row(info), task_id))
            self._db.execute("UPDATE tasks SET updated_at = ? WHERE task_id = ?", (info.created_at, task_id))
        self._notify(task_id)
        return info

    def read_piece(self, task_id: str, number: int) -> bytes:
        """A finished piece's bytes."""
        info = self.piece(task_id, number)
        if info is None:
            raise StorageError(f"task {task_id} piece {number} is not finished")
        data = os.pread(self._fd(task_id), info.length, info.offset)
        if len(data) != info.length:
            raise StorageError(f"task {task_id} piece {number}: content file is truncated")
        return data

    @contextlib.contextmanager
    def content_fd(self, task_id: str, *, direct: bool = False) -> Iterator[int]:
        """A read-only descriptor of a task's content file for the block; it survives the task's deletion.
        *direct* asks for ``O_DIRECT`` where the filesystem has it (read it with ``direct_io.read_into``)."""
        self._task_or_raise(task_id)
        try:
            if direct:
                fd, _ = open_direct(self.content_path(task_id), os.O_RDONLY)
            else:
                fd = os.open(self.content_path(task_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(f"task {task_id} has no content file") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def finish_task(self, task_id: str) -> TaskInfo:
        """Mark a task succeeded once every piece is stored."""
        info = self._task_or_raise(task_id)
        if info.finished_pieces != info.piece_count:
            raise StorageError(f"task {task_id} has {info.finished_pieces} of {info.piece_count} pieces")
        self._set_state(task_id, SUCCEEDED)
        return self._task_or_raise(task_id)

    def fail_task(self, task_id: str) -> None:
        """Mark a task failed; its watchers raise StorageError."""
        self._task_or_raise(task_id)
        self._set_state(task_id, FAILED)

    def _set_state(self, task_id: str, state: str) -> None:
        with self._db:
            self._db.execute("UPDATE tasks SET state = ?, updated_at = ? WHERE task_id = ?",
                             (state, time.time(), task_id))
        self._notify(task_id)

    def delete_task(self, task_id: str) -> bool:
        """Remove a task's file and rows, waking its watchers; False if it was unknown."""
        path = self.content_path(task_id)
        with self._db:
            found = self._db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,)).rowcount > 0
            self._db.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
        fd = self._fds.pop(task_id, None)
        if fd is not None:
            os.close(fd)
        path.unlink(missing_ok=True)
        self._notify(task_id)
        return found

    def touch(self, task_id: str) -> None:
        """Record a use of a task (GC evicts the least recently updated first)."""
        with self._db:
            self._db.execute("UPDATE tasks SET updated_at = ? WHERE task_id = ?", (time.time(), task_id))

    def stored_bytes(self, task_id: str | None = None) -> int:
        """Bytes of finished pieces, of one task or of all."""
        query = "SELECT COALESCE(SUM(length), 0) FROM pieces"
        if task_id is None:
            return int(self._db.execute(query).fetchone()[0])
        return int(self._db.execute(f"{query} WHERE task_id = ?", (task_id,)).fetchone()[0])

    def _disk_usage(self, capacity: int | None) -> tuple[int, int]:
        """``(used, total)`` bytes: our pieces against *capacity*, else the filesystem holding data_dir."""
        if capacity is not None:
            return self.stored_bytes(), capacity
        st = os.statvfs(self.data_dir)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    def collect_garbage(self, *, ttl: float, high_percent: float, low_percent: float, capacity: int | None = None,
                        now: float | None = None) -> list[str]:
        """Delete tasks idle for *ttl* seconds, then evict finished or failed ones, least recently updated
        first, from *high_percent* disk use down to *low_percent*; returns the deleted ids."""
        now = time.time() if now is None else now
        deleted = [t.task_id for t in self.tasks() if t.updated_at < now - ttl]
        for task_id in deleted:
            self.delete_task(task_id)
        used, total = self._disk_usage(capacity)
        if total <= 0 or used * 100 < high_percent * total:
            return deleted
        for info in self.tasks():
            if used * 100 <= low_percent * total:
                break
            if info.state != RUNNING:
                used -= self.stored_bytes(info.task_id)
                self.delete_task(info.task_id)
                deleted.append(info.task_id)
        return deleted

    def _notify(self, task_id: str) -> None:
        event = self._changed.pop(task_id, None)
        if event is not None:
            event.set()

    async def watch(self, task_id: str, numbers: Collection[int] | None = None) -> AsyncIterator[PieceInfo]:
        """Yield the wanted finished pieces (all by default), present ones first, then each as it is written;
        StorageError if the task is unknown, fails, is deleted or storage closes meanwhile."""
        info = self._task_or_raise(task_id)
        wanted = set(range(info.piece_count)) if numbers is None else set(numbers)
        for number in wanted:
            info.piece_span(number)
        seen = 0
        while wanted:
            changed = self._changed.setdefault(task_id, trio.Event())
            rows = self._db.execute(f"SELECT seq, {_PIECE_COLUMNS} FROM pieces WHERE task_id = ? AND seq > ? "
                                    "ORDER BY seq", (task_id, seen)).fetchall()
            for seq, *fields in rows:
                seen = seq
                if fields[0] in wanted:
                    wanted.discard(fields[0])
                    yield PieceInfo(*fields)
            if not wanted:
                return
            self._check_watchable(task_id)
            await changed.wait()
            if self._closed:
                raise StorageError(f"storage closed while watching task {task_id}")

    def _check_watchable(self, task_id: str) -> None:
        row = self._db.execute("SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()  # no piece count
        if row is None:
            raise StorageError(f"task {task_id} was deleted")
        if row[0] == FAILED:
            raise StorageError(f"task {task_id} failed")


def _write_file(path: Path, data: Bytes, offset: int, digest: str | None) -> str:
    """Write *data* at *offset* (bypassing the page cache where it can); the piece digest (computed if not given)."""
    write_at(path, data, offset)
    return digest or piece_digest(data)


def _piece_row(info: PieceInfo) -> tuple[int, int, int, str, str, int, int, float]:
    return (info.number, info.offset, info.length, info.digest, info.parent_id, info.traffic_type, info.cost_ns,
            info.created_at)
