"""The per-host chunk cache, in nydusd's on-disk layout (nydus-format.md §5).

Per blob, ``<blob_id>.blob.data`` is a sparse file holding each ready chunk uncompressed at its
``uncompressed_offset`` (so a complete one is directly a kernel EROFS device), and
``<blob_id>.blob.data.chunk_map`` is a 4096-byte header followed by an MSB-first ready bitmap indexed
by ci index. A bit is set only after its chunk's data is written (and, when durable, synced), so a
crash can lose bits but never mark unwritten data ready. Several processes may share one cache: every
bitmap change is a read-modify-write of single bytes under ``fcntl.lockf``.

:class:`CacheManager` keeps ``cache.db`` (SQLite) beside the blobs: sizes, last use and the mounts
using each blob, for ``lazyfs cache ls`` and LRU eviction (``lazyfs cache gc``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.chunks.digest import verify
from lazyfs.errors import DigestMismatch, FormatError, LazyfsError
from lazyfs.rafs.tree import BlobInfo, ChunkRef

log = logging.getLogger(__name__)

MAP_MAGIC = 0x424D4150
MAP_VERSION = 1
MAP_MAGIC2 = 0x434D4150
MAP_ALL_READY = 0x4D4D4150
MAP_HEADER_SIZE = 4096
DATA_SUFFIX = ".blob.data"
MAP_SUFFIX = ".blob.data.chunk_map"
DB_NAME = "cache.db"
_HEADER = struct.Struct("<4I")
_ALL_READY_OFFSET = 12
_BLOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# POSIX record locks belong to the process, so threads (and several BlobCache objects for one blob)
# must also exclude each other; the sections it guards are a few tiny preads and pwrites.
_PROCESS_LOCK = threading.Lock()


class CacheError(LazyfsError):
    """The chunk cache cannot do what was asked (e.g. remove a blob a live mount uses)."""


class CacheMiss(CacheError):
    """A chunk is not in the cache, or its cached data was unusable and has been invalidated."""


def check_blob_id(blob_id: str) -> str:
    """Return *blob_id* if it is safe as a file name, else raise FormatError."""
    if not _BLOB_ID.fullmatch(blob_id):
        raise FormatError(f"blob id {blob_id[:80]!r} is not a valid file name")
    return blob_id


def blob_files(cache_dir: Path, blob_id: str) -> tuple[Path, Path]:
    """The ``.blob.data`` and ``.blob.data.chunk_map`` paths of *blob_id* in *cache_dir*."""
    base = f"{cache_dir / check_blob_id(blob_id)}"
    return Path(base + DATA_SUFFIX), Path(base + MAP_SUFFIX)


def check_chunk(blob: BlobInfo, ref: ChunkRef) -> None:
    """Raise FormatError unless *ref* lies inside *blob*, compressed and uncompressed, with sane sizes."""
    ok = (
        0 <= ref.index < blob.chunk_count
        and 0 < ref.uncompressed_size <= blob.chunk_size
        and 0 < ref.compressed_size <= blob.chunk_size
        and 0 <= ref.uncompressed_offset <= blob.uncompressed_size - ref.uncompressed_size
        and 0 <= ref.compressed_offset <= blob.compressed_size - ref.compressed_size
    )
    if not ok:
        raise FormatError(
            f"blob {blob.blob_id} chunk {ref.index} (compressed {ref.compressed_offset}+{ref.compressed_size}, "
            f"uncompressed {ref.uncompressed_offset}+{ref.uncompressed_size}) lies outside the blob"
        )


def _check_blob(blob: BlobInfo) -> None:
    check_blob_id(blob.blob_id)
    if blob.chunk_count <= 0 or not 0 < blob.uncompressed_size <= blob.chunk_count * blob.chunk_size:
        raise FormatError(
            f"blob {blob.blob_id}: {blob.chunk_count} chunks of at most {blob.chunk_size} bytes "
            f"cannot fill {blob.uncompressed_size} bytes"
        )


def _bit(index: int) -> tuple[int, int]:
    """Bitmap byte position and MSB-first mask of chunk *index*."""
    return index >> 3, 0x80 >> (index & 7)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to *size* bytes at *offset*, fewer only at end of file."""
    parts = []
    while size:
        part = os.pread(fd, size, offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


def _read_byte(fd: int, offset: int) -> int:
    """The byte at *offset* (0 past the end of the file)."""
    found = os.pread(fd, 1, offset)
    return found[0] if found else 0


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _new_map(chunk_count: int) -> bytes:
    """A chunk map with no chunk ready."""
    header = _HEADER.pack(MAP_MAGIC, MAP_VERSION, MAP_MAGIC2, 0).ljust(MAP_HEADER_SIZE, b"\0")
    return header + bytes(-(-chunk_count // 8))


def parse_map(raw: bytes, chunk_count: int) -> bytearray:
    """The bitmap of a chunk map file's content; FormatError naming the problem if it is not valid."""
    expected = MAP_HEADER_SIZE + -(-chunk_count // 8)
    if len(raw) != expected:
        raise FormatError(f"size {len(raw)} != {expected} for {chunk_count} chunks")
    magic, version, magic2, all_ready = _HEADER.unpack_from(raw)
    if (magic, version, magic2) != (MAP_MAGIC, MAP_VERSION, MAP_MAGIC2):
        raise FormatError(f"bad header magic {magic:#x} version {version} magic2 {magic2:#x}")
    bitmap = bytearray(raw[MAP_HEADER_SIZE:])
    ready = int.from_bytes(bitmap, "big").bit_count()
    if chunk_count % 8 and bitmap[-1] & (0xFF >> (chunk_count % 8)):
        raise FormatError("bits set past the last chunk")
    if all_ready not in (0, MAP_ALL_READY) or (all_ready == MAP_ALL_READY and ready != chunk_count):
        raise FormatError(f"all_ready {all_ready:#x} disagrees with {ready} of {chunk_count} chunks ready")
    return bitmap


class BlobCache:
    """The cache files of one blob; methods are thread-safe and block (run them off the trio loop).

    Obtain one with :meth:`open` (or :meth:`CacheManager.open_blob`), and :meth:`close` it when done.
    """

    def __init__(self, blob: BlobInfo, data_fd: int, map_fd: int, bitmap: bytearray, durable: bool) -> None:
        self.blob = blob
        self.durable = durable
        self._data_fd = data_fd
        self._map_fd = map_fd
        self._bitmap = bitmap  # what this process knows is ready; refreshed from disk on misses
        self._ready = int.from_bytes(bitmap, "big").bit_count()
        self._mem_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, cache_dir: Path, blob: BlobInfo, *, durable: bool = True) -> BlobCache:
        """Open (creating, validating, and if need be resetting) the cache files of *blob*.

        With *durable* (the default) chunk data is fdatasync'ed before its bit is set, which keeps
        the cache consistent across power loss; without it only process crashes are safe.
        """
        _check_blob(blob)
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_path, map_path = blob_files(cache_dir, blob.blob_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        map_fd = os.open(map_path, flags, 0o600)
        try:
            data_fd = os.open(data_path, flags, 0o600)
        except OSError:
            os.close(map_fd)
            raise
        try:
            with _PROCESS_LOCK, _file_lock(map_fd):
                bitmap = _prepare(blob, data_fd, map_fd)
        except BaseException:
            os.close(data_fd)
            os.close(map_fd)
            raise
        return cls(blob, data_fd, map_fd, bitmap, durable)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.blob.chunk_count:
            raise FormatError(f"blob {self.blob.blob_id}: chunk index {index} >= {self.blob.chunk_count}")

    def is_ready(self, index: int) -> bool:
        """Whether chunk *index* is cached (by this or any other process sharing the cache)."""
        self._check_index(index)
        pos, mask = _bit(index)
        if self._bitmap[pos] & mask:
            return True
        self._learn(pos, _read_byte(self._map_fd, MAP_HEADER_SIZE + pos))
        return bool(self._bitmap[pos] & mask)

    def _learn(self, pos: int, value: int) -> None:
        """Merge bits seen on disk into the in-memory bitmap."""
        with self._mem_lock:
            old = self._bitmap[pos]
            new = old | value
            if new != old:
                self._bitmap[pos] = new
                self._ready += new.bit_count() - old.bit_count()

    def advise(self, ref: ChunkRef) -> bool:
        """Ask the kernel to start reading a ready chunk into the page cache; False if not ready."""
        if not self.is_ready(ref.index):
            return False
        os.posix_fadvise(self._data_fd, ref.uncompressed_offset, ref.uncompressed_size, os.POSIX_FADV_WILLNEED)
        return True

    def read_range(self, ref: ChunkRef, start: int, stop: int) -> bytes | None:
        """Bytes ``[start, stop)`` of a ready chunk (verified when it was stored), or None if not ready.

        A plain pread of the page cache: this is the fast path of cached reads.
        """
        if not 0 <= start <= stop <= ref.uncompressed_size or not self.is_ready(ref.index):
            return None
        data = os.pread(self._data_fd, stop - start, ref.uncompressed_offset + start)
        return data if len(data) == stop - start else None

    def read(self, ref: ChunkRef, *, verify_digest: bool = True) -> bytes:
        """The uncompressed data of a ready chunk, digest-checked unless *verify_digest* is false.

        Raises :class:`CacheMiss` if the chunk is not ready, or if its data is short or corrupt (the
        chunk is then invalidated, so it gets fetched again).
        """
        check_chunk(self.blob, ref)
        if not self.is_ready(ref.index):
            raise CacheMiss(f"blob {self.blob.blob_id} chunk {ref.index} is not cached")
        data = _pread_exact(self._data_fd, ref.uncompressed_size, ref.uncompressed_offset)
        try:
            if len(data) != ref.uncompressed_size:
                raise DigestMismatch(f"only {len(data)} of {ref.uncompressed_size} bytes in the data file")
            if verify_digest:
                verify(self.blob.digester, data, ref.digest, f"cached blob {self.blob.blob_id} chunk {ref.index}")
        except DigestMismatch as exc:
            log.warning("cache invalidate blob=%s chunk=%d reason=%r", self.blob.blob_id, ref.index, str(exc))
            self.invalidate(ref.index)
            raise CacheMiss(str(exc)) from exc
        return data

    def store(self, ref: ChunkRef, data: bytes) -> None:
        """Write one verified chunk and mark it ready."""
        self.store_many([(ref, data)])

    def store_many(self, chunks: Sequence[tuple[ChunkRef, bytes]]) -> None:
        """Write verified chunks at their uncompressed offsets, sync them if durable, then mark them ready."""
        for ref, data in chunks:
            check_chunk(self.blob, ref)
            if len(data) != ref.uncompressed_size:
                raise ValueError(f"chunk {ref.index}: {len(data)} bytes, expected {ref.uncompressed_size}")
        for ref, data in chunks:
            _pwrite_all(self._data_fd, data, ref.uncompressed_offset)
        if self.durable:
            os.fdatasync(self._data_fd)
        self._set_bits(ref.index for ref, _ in chunks)

    def _set_bits(self, indexes: Iterable[int]) -> None:
        masks: dict[int, int] = {}
        for index in indexes:
            pos, mask = _bit(index)
            masks[pos] = masks.get(pos, 0) | mask
        with _PROCESS_LOCK, _file_lock(self._map_fd):
            for pos, mask in sorted(masks.items()):
                current = _read_byte(self._map_fd, MAP_HEADER_SIZE + pos)
                if current | mask != current:
                    os.pwrite(self._map_fd, bytes([current | mask]), MAP_HEADER_SIZE + pos)
                self._learn(pos, current | mask)
            if self._ready == self.blob.chunk_count:
                self._write_all_ready(MAP_ALL_READY)

    def _write_all_ready(self, value: int) -> None:
        os.pwrite(self._map_fd, value.to_bytes(4, "little"), _ALL_READY_OFFSET)

    def invalidate(self, index: int) -> None:
        """Mark chunk *index* not ready (its cached data turned out to be bad)."""
        self._check_index(index)
        pos, mask = _bit(index)
        with _PROCESS_LOCK, _file_lock(self._map_fd):
            current = _read_byte(self._map_fd, MAP_HEADER_SIZE + pos)
            if current & mask:
                os.pwrite(self._map_fd, bytes([current & ~mask]), MAP_HEADER_SIZE + pos)
            self._write_all_ready(0)
            with self._mem_lock:
                if self._bitmap[pos] & mask:
                    self._bitmap[pos] &= ~mask
                    self._ready -= 1

    def ready_count(self) -> int:
        """How many chunks are ready, counting those other processes stored."""
        raw = _pread_exact(self._map_fd, len(self._bitmap), MAP_HEADER_SIZE)
        for pos, value in enumerate(raw):
            if value & ~self._bitmap[pos]:
                self._learn(pos, value)
        return int.from_bytes(raw, "big").bit_count()

    def close(self) -> None:
        """Write ``all_ready`` if the blob is complete (others may have finished it), and close the files."""
        with _PROCESS_LOCK:
            if self._closed:
                return
            self._closed = True
            try:
                if self.ready_count() == self.blob.chunk_count:
                    with _file_lock(self._map_fd):
                        self._write_all_ready(MAP_ALL_READY)
            finally:
                os.close(self._data_fd)
                os.close(self._map_fd)


@contextlib.contextmanager
def _file_lock(fd: int) -> Iterator[None]:
    """Hold an exclusive POSIX lock on the whole file *fd* (callers also hold ``_PROCESS_LOCK``)."""
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _prepare(blob: BlobInfo, data_fd: int, map_fd: int) -> bytearray:
    """Validate the chunk map and the data file size, resetting whichever cannot be trusted."""
    expected = MAP_HEADER_SIZE + -(-blob.chunk_count // 8)
    raw = _pread_exact(map_fd, expected + 1, 0)
    data_size = os.fstat(data_fd).st_size
    problem = ""
    if not raw:
        pass  # a new map
    elif data_size != blob.uncompressed_size:
        problem = f"data file is {data_size} bytes, expected {blob.uncompressed_size}"
    else:
        try:
            bitmap = parse_map(raw, blob.chunk_count)
        except FormatError as exc:
            problem = str(exc)
        else:
            if int.from_bytes(bitmap, "big").bit_count() == blob.chunk_count:
                os.pwrite(map_fd, MAP_ALL_READY.to_bytes(4, "little"), _ALL_READY_OFFSET)
            return bitmap
    if problem:
        log.warning("cache reset blob=%s reason=%r", blob.blob_id, problem)
    # The empty map must be on disk before the data file changes, so no crash leaves stale bits.
    os.ftruncate(map_fd, 0)
    _pwrite_all(map_fd, _new_map(blob.chunk_count), 0)
    os.fsync(map_fd)
    if data_size != blob.uncompressed_size:
        os.ftruncate(data_fd, 0)
        os.ftruncate(data_fd, blob.uncompressed_size)
    return bytearray(expected - MAP_HEADER_SIZE)


# --- the per-host index ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """One cached blob, as ``lazyfs cache ls`` shows it."""

    blob_id: str
    disk_bytes: int  # blocks actually allocated by the data file and chunk map
    last_used: float  # seconds since the epoch
    ready_chunks: int
    chunk_count: int  # 0 when no mount has opened the blob since the index was created
    owners: tuple[str, ...]  # live mounts using the blob

    @property
    def in_use(self) -> bool:
        """Whether a live mount uses the blob (it is then never evicted)."""
        return bool(self.owners)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    blob_id TEXT PRIMARY KEY,
    disk_bytes INTEGER NOT NULL DEFAULT 0,
    last_used REAL NOT NULL,
    ready_chunks INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS users (
    blob_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    PRIMARY KEY (blob_id, owner)
);
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _ready_on_disk(map_path: Path) -> int:
    """Ready chunks according to a chunk map file, trusting only a well-formed header."""
    try:
        raw = map_path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(raw) < MAP_HEADER_SIZE or _HEADER.unpack_from(raw)[:3] != (MAP_MAGIC, MAP_VERSION, MAP_MAGIC2):
        return 0
    return int.from_bytes(raw[MAP_HEADER_SIZE:], "big").bit_count()


class CacheManager:
    """The per-host cache directory: opens blob caches and keeps the ``cache.db`` index for ls and gc.

    Mounts :meth:`acquire` a blob before using it (``open_blob`` does) and :meth:`release` it after;
    :meth:`gc` never evicts a blob that a live process holds. Methods block (SQLite, stat).
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.cache_dir / DB_NAME, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the index."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def open_blob(self, blob: BlobInfo, owner: str, *, durable: bool = True) -> BlobCache:
        """Acquire *blob* for *owner*, then open its cache files."""
        self.acquire(blob.blob_id, owner)
        try:
            cache = BlobCache.open(self.cache_dir, blob, durable=durable)
        except BaseException:
            self.release(blob.blob_id, owner)
            raise
        self.touch(cache)
        return cache

    def touch(self, cache: BlobCache) -> None:
        """Record that *cache*'s blob was just used, with its current size and ready count."""
        data, chunk_map = blob_files(self.cache_dir, cache.blob.blob_id)
        row = (cache.blob.blob_id, _disk_bytes(data) + _disk_bytes(chunk_map), time.time(), cache.ready_count(),
               cache.blob.chunk_count)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO blobs VALUES (?, ?, ?, ?, ?) ON CONFLICT(blob_id) DO UPDATE SET "
                "disk_bytes=excluded.disk_bytes, last_used=excluded.last_used, "
                "ready_chunks=excluded.ready_chunks, chunk_count=excluded.chunk_count",
                row,
            )

    def acquire(self, blob_id: str, owner: str, pid: int | None = None) -> None:
        """Mark *blob_id* in use by *owner* (a mount id) of process *pid* (default: this one)."""
        check_blob_id(blob_id)
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO blobs (blob_id, last_used) VALUES (?, ?)", (blob_id, time.time()))
            db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?)", (blob_id, owner, pid or os.getpid()))

    def release(self, blob_id: str, owner: str) -> None:
        """*owner* no longer uses *blob_id*; it becomes evictable once no one else does."""
        with self._transaction() as db:
            db.execute("DELETE FROM users WHERE blob_id = ? AND owner = ?", (blob_id, owner))
            db.execute("UPDATE blobs SET last_used = ? WHERE blob_id = ?", (time.time(), blob_id))

    def ls(self) -> list[BlobEntry]:
        """Every cached blob, least recently used first."""
        with self._transaction() as db:
            self._sync(db)
            owners = self._live_owners(db)
            rows = db.execute("SELECT * FROM blobs ORDER BY last_used, blob_id").fetchall()
        return [BlobEntry(r[0], r[1], r[2], r[3], r[4], tuple(sorted(owners.get(r[0], ())))) for r in rows]

    def gc(self, limit_bytes: int) -> list[str]:
        """Evict least recently used blobs no live process holds until the cache fits *limit_bytes*.

        Returns the evicted blob ids, oldest first.
        """
        evicted = []
        with self._transaction() as db:
            self._sync(db)
            busy = self._live_owners(db)
            rows = db.execute("SELECT blob_id, disk_bytes FROM blobs ORDER BY last_used, blob_id").fetchall()
            total = sum(size for _, size in rows)
            for blob_id, size in rows:
                if total <= limit_bytes:
                    break
                if blob_id not in busy:
                    self._delete(db, blob_id)
                    total -= size
                    evicted.append(blob_id)
        for blob_id in evicted:
            log.info("cache evict blob=%s", blob_id)
        return evicted

    def remove(self, blob_id: str) -> None:
        """Delete one blob's cache files; CacheError if a live process holds it."""
        with self._transaction() as db:
            owners = self._live_owners(db).get(blob_id)
            if owners:
                raise CacheError(f"blob {blob_id} is in use by {', '.join(sorted(owners))}")
            self._delete(db, blob_id)

    def _delete(self, db: sqlite3.Connection, blob_id: str) -> None:
        for path in blob_files(self.cache_dir, blob_id):
            path.unlink(missing_ok=True)
        db.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))

    def _live_owners(self, db: sqlite3.Connection) -> dict[str, set[str]]:
        """Owners by blob id, forgetting those whose process has died."""
        live: dict[str, set[str]] = {}
        for blob_id, owner, pid in db.execute("SELECT blob_id, owner, pid FROM users").fetchall():
            if _pid_alive(pid):
                live.setdefault(blob_id, set()).add(owner)
            else:
                log.info("cache drop dead owner blob=%s owner=%s pid=%d", blob_id, owner, pid)
                db.execute("DELETE FROM users WHERE blob_id = ? AND owner = ?", (blob_id, owner))
        return live

    def _sync(self, db: sqlite3.Connection) -> None:
        """Bring the index in line with the files: sizes, ready counts, blobs added or deleted behind its back."""
        on_disk = {
            p.name.removesuffix(DATA_SUFFIX): p
            for p in self.cache_dir.glob(f"*{DATA_SUFFIX}")
            if _BLOB_ID.fullmatch(p.name.removesuffix(DATA_SUFFIX))
        }
        known = {row[0] for row in db.execute("SELECT blob_id FROM blobs").fetchall()}
        in_use = {row[0] for row in db.execute("SELECT DISTINCT blob_id FROM users").fetchall()}
        for blob_id in known - on_disk.keys() - in_use:
            db.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))
        for blob_id, data in on_disk.items():
            chunk_map = blob_files(self.cache_dir, blob_id)[1]
            with contextlib.suppress(FileNotFoundError):
                db.execute("INSERT OR IGNORE INTO blobs (blob_id, last_used) VALUES (?, ?)",
                           (blob_id, data.stat().st_mtime))
            db.execute(
                "UPDATE blobs SET disk_bytes = ?, ready_chunks = ? WHERE blob_id = ?",
                (_disk_bytes(data) + _disk_bytes(chunk_map), _ready_on_disk(chunk_map), blob_id),
            )
