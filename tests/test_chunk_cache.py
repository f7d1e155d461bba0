"""BlobCache (nydusd's cache layout, shared across processes, crash-safe) and CacheManager (index, LRU gc)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lazyfs.chunks.cache import (
    MAP_ALL_READY,
    BlobCache,
    CacheError,
    CacheManager,
    CacheMiss,
    check_blob_id,
)
from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester, digest
from lazyfs.errors import FormatError
from lazyfs.rafs.blob import read_chunk
from lazyfs.rafs.builder import BuildOptions, build_layer
from lazyfs.rafs.export import export_blob_data, unique_chunks
from lazyfs.rafs.tree import BlobInfo, ChunkRef

CHUNK = 4096


def synthetic_blob(count: int, name: str = "blob") -> tuple[BlobInfo, list[ChunkRef], list[bytes]]:
    """A blob of *count* distinct stored (uncompressed) 4 KiB chunks; no blob file needed."""
    datas = [i.to_bytes(4, "big") * (CHUNK // 4) for i in range(count)]
    refs = [
        ChunkRef(0, i, digest(Digester.BLAKE3, d), i * CHUNK, CHUNK, i * CHUNK, CHUNK) for i, d in enumerate(datas)
    ]
    blob = BlobInfo(
        blob_id=hashlib.sha256(f"{name}-{count}".encode()).hexdigest(), chunk_count=count, chunk_size=CHUNK,
        compressor=Compressor.NONE, digester=Digester.BLAKE3, features=0, compressed_size=count * CHUNK,
        uncompressed_size=count * CHUNK, ci_compressor=Compressor.NONE, ci_offset=0, ci_compressed_size=0,
        ci_uncompressed_size=0,
    )
    return blob, refs, datas


def map_path(cache_dir: Path, blob: BlobInfo) -> Path:
    return cache_dir / f"{blob.blob_id}.blob.data.chunk_map"


def data_path(cache_dir: Path, blob: BlobInfo) -> Path:
    return cache_dir / f"{blob.blob_id}.blob.data"


def header(cache_dir: Path, blob: BlobInfo) -> tuple[int, ...]:
    return struct.unpack("<4I", map_path(cache_dir, blob).read_bytes()[:16])


def test_store_read_round_trip_and_on_disk_format(tmp_path: Path) -> None:
    blob, refs, datas = synthetic_blob(20)
    cache = BlobCache.open(tmp_path, blob)
    try:
        for i in (0, 9, 19):
            cache.store(refs[i], datas[i])
        assert [i for i in range(20) if cache.is_ready(i)] == [0, 9, 19]
        assert cache.ready_count() == 3
        assert cache.read(refs[9]) == datas[9]
        with pytest.raises(CacheMiss):
            cache.read(refs[1])
    finally:
        cache.close()

    raw = map_path(tmp_path, blob).read_bytes()
    assert len(raw) == 4096 + 3  # header plus ceil(20 / 8) bitmap bytes
    assert header(tmp_path, blob) == (0x424D4150, 1, 0x434D4150, 0)
    assert raw[16:4096] == bytes(4096 - 16)
    assert raw[4096:] == bytes([0x80, 0x40, 0x10])  # MSB-first: chunks 0, 9 and 19
    data = data_path(tmp_path, blob)
    assert data.stat().st_size == blob.uncompressed_size
    assert data.stat().st_blocks * 512 < blob.uncompressed_size  # sparse
    with data.open("rb") as f:
        f.seek(refs[19].uncompressed_offset)
        assert f.read(CHUNK) == datas[19]

    reopened = BlobCache.open(tmp_path, blob)
    try:
        assert reopened.ready_count() == 3
        assert reopened.read(refs[0]) == datas[0]
    finally:
        reopened.close()


def test_all_ready_written_when_complete_and_cleared_on_invalidate(tmp_path: Path) -> None:
    blob, refs, datas = synthetic_blob(11)
    cache = BlobCache.open(tmp_path, blob)
    try:
        cache.store_many(list(zip(refs[:10], datas[:10], strict=True)))
        assert header(tmp_path, blob)[3] == 0
        cache.store(refs[10], datas[10])
        assert header(tmp_path, blob)[3] == MAP_ALL_READY
        assert map_path(tmp_path, blob).read_bytes()[4096:] == b"\xff\xe0"
        cache.invalidate(3)
        assert header(tmp_path, blob)[3] == 0
        assert not cache.is_ready(3)
        assert map_path(tmp_path, blob).read_bytes()[4096:] == b"\xef\xe0"
    finally:
        cache.close()


def test_completed_cache_is_byte_identical_to_export(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(3000 * i + 1) + b"x" * 20000 * (i % 3))
    result = build_layer(src, tmp_path / "blobs", BuildOptions(chunk_size=0x4000))
    assert result.blob is not None and result.blob_path is not None
    blob = result.blob
    exported = export_blob_data(result.tree, tmp_path / "blobs", tmp_path / "export")[0]

    cache = BlobCache.open(tmp_path / "cache", blob)
    try:
        with result.blob_path.open("rb") as f:
            for ref in unique_chunks(result.tree)[0].values():
                cache.store(ref, read_chunk(f, blob, ref))
        assert cache.ready_count() == blob.chunk_count
    finally:
        cache.close()
    assert data_path(tmp_path / "cache", blob).read_bytes() == exported.read_bytes()
    assert header(tmp_path / "cache", blob)[3] == MAP_ALL_READY


def _store_stride(cache_dir: str, count: int, first: int, stride: int, barrier: multiprocessing.synchronize.Barrier
                  ) -> None:
    blob, refs, datas = synthetic_blob(count)
    cache = BlobCache.open(Path(cache_dir), blob, durable=False)
    barrier.wait()
    for i in range(first, count, stride):
        cache.store(refs[i], datas[i])
    cache.close()


def test_processes_sharing_a_blob_lose_no_bits(tmp_path: Path) -> None:
    count, workers = 3001, 3
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [
        ctx.Process(target=_store_stride, args=(str(tmp_path), count, k, workers, barrier)) for k in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    blob, refs, datas = synthetic_blob(count)
    raw = map_path(tmp_path, blob).read_bytes()
    assert raw[4096:] == b"\xff" * (count // 8) + b"\x80"
    assert header(tmp_path, blob)[3] == MAP_ALL_READY
    cache = BlobCache.open(tmp_path, blob)
    try:
        assert all(cache.read(ref) == data for ref, data in zip(refs, datas, strict=True))
    finally:
        cache.close()


def _corrupt_bad_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[0] ^= 1
    path.write_bytes(raw)


def _corrupt_size(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\xff")


def _corrupt_all_ready_lie(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[12:16] = MAP_ALL_READY.to_bytes(4, "little")
    path.write_bytes(raw)


def _corrupt_trailing_bits(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] |= 0x01  # past chunk 19
    path.write_bytes(raw)


@pytest.mark.parametrize("corrupt", [_corrupt_bad_magic, _corrupt_size, _corrupt_all_ready_lie, _corrupt_trailing_bits])
def test_corrupt_chunk_map_is_rebuilt_empty(
    tmp_path: Path, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    blob, refs, datas = synthetic_blob(20)
    cache = BlobCache.open(tmp_path, blob)
    cache.store_many(list(zip(refs[:5], datas[:5], strict=True)))
    cache.close()
    corrupt(map_path(tmp_path, blob))
    with caplog.at_level(logging.WARNING, logger="lazyfs.chunks.cache"):
        cache = BlobCache.open(tmp_path, blob)
    try:
        assert cache.ready_count() == 0
        assert not any(cache.is_ready(i) for i in range(20))
        assert f"cache reset blob={blob.blob_id}" in caplog.text
        assert header(tmp_path, blob) == (0x424D4150, 1, 0x434D4150, 0)
        assert len(map_path(tmp_path, blob).read_bytes()) == 4096 + 3
    finally:
        cache.close()


def test_wrong_data_file_size_resets_cache(tmp_path: Path) -> None:
    blob, refs, datas = synthetic_blob(20)
    cache = BlobCache.open(tmp_path, blob)
    cache.store(refs[19], datas[19])
    cache.close()
    os.truncate(data_path(tmp_path, blob), 10 * CHUNK)  # chunk 19's data is gone
    cache = BlobCache.open(tmp_path, blob)
    try:
        assert cache.ready_count() == 0
        assert data_path(tmp_path, blob).stat().st_size == blob.uncompressed_size
    finally:
        cache.close()


def test_corrupt_cached_data_is_invalidated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blob, refs, datas = synthetic_blob(20)
    cache = BlobCache.open(tmp_path, blob)
    try:
        cache.store(refs[4], datas[4])
        with data_path(tmp_path, blob).open("r+b") as f:
            f.seek(refs[4].uncompressed_offset + 100)
            f.write(b"!")
        with caplog.at_level(logging.WARNING), pytest.raises(CacheMiss):
            cache.read(refs[4])
        assert f"cache invalidate blob={blob.blob_id} chunk=4" in caplog.text
        assert not cache.is_ready(4)
        assert map_path(tmp_path, blob).read_bytes()[4096] == 0
        cache.store(refs[4], datas[4])  # refetched
        assert cache.read(refs[4]) == datas[4]
    finally:
        cache.close()


def test_bit_is_set_only_after_data_is_written_and_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob, refs, datas = synthetic_blob(20)
    cache = BlobCache.open(tmp_path, blob)
    data_ino = data_path(tmp_path, blob).stat().st_ino
    events: list[str] = []
    real_pwrite, real_fdatasync = os.pwrite, os.fdatasync

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        events.append("data" if os.fstat(fd).st_ino == data_ino else "bit")
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        events.append("sync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        cache.store_many([(refs[1], datas[1]), (refs[2], datas[2])])
    finally:
        monkeypatch.undo()
        cache.close()
    assert events == ["data", "data", "sync", "bit"]


def _store_forever(cache_dir: str, count: int) -> None:
    blob, refs, datas = synthetic_blob(count)
    cache = BlobCache.open(Path(cache_dir), blob)
    while True:
        for ref, data in zip(refs, datas, strict=True):
            cache.invalidate(ref.index)
            cache.store(ref, data)


def test_kill_during_stores_leaves_no_bad_ready_chunk(tmp_path: Path) -> None:
    count = 64
    proc = multiprocessing.get_context("spawn").Process(target=_store_forever, args=(str(tmp_path), count))
    proc.start()
    blob, refs, datas = synthetic_blob(count)
    deadline = time.monotonic() + 20
    while not map_path(tmp_path, blob).exists() or max(map_path(tmp_path, blob).read_bytes()[4096:] or b"\0") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    cache = BlobCache.open(tmp_path, blob)
    try:
        ready = [ref for ref in refs if cache.is_ready(ref.index)]
        assert ready
        for ref in ready:
            assert cache.read(ref) == datas[ref.index]
    finally:
        cache.close()


def test_hostile_blob_and_chunk_are_refused(tmp_path: Path) -> None:
    blob, refs, datas = synthetic_blob(4)
    with pytest.raises(FormatError):
        check_blob_id("../etc")
    with pytest.raises(FormatError):
        BlobCache.open(tmp_path, dataclasses.replace(blob, blob_id="../../x"))
    with pytest.raises(FormatError):
        BlobCache.open(tmp_path, dataclasses.replace(blob, uncompressed_size=1 << 50))
    cache = BlobCache.open(tmp_path, blob)
    try:
        past_end = ChunkRef(0, 3, refs[3].digest, 3 * CHUNK, CHUNK, 4 * CHUNK, CHUNK)
        with pytest.raises(FormatError):
            cache.store(past_end, datas[3])
        with pytest.raises(FormatError):
            cache.is_ready(4)
    finally:
        cache.close()


# --- CacheManager -----------------------------------------------------------------------------------------


def _cached_blob(manager: CacheManager, name: str, chunks: int, owner: str) -> BlobInfo:
    """Open a synthetic blob through *manager*, store *chunks* chunks, close and release it."""
    blob, refs, datas = synthetic_blob(16, name)
    cache = manager.open_blob(blob, owner, durable=False)
    cache.store_many(list(zip(refs[:chunks], datas[:chunks], strict=True)))
    manager.touch(cache)
    cache.close()
    manager.release(blob.blob_id, owner)
    time.sleep(0.01)  # distinct last_used stamps
    return blob


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_ls_reports_sizes_ready_chunks_and_owners(tmp_path: Path) -> None:
    manager = CacheManager(tmp_path)
    try:
        a = _cached_blob(manager, "a", 3, "m1")
        b = _cached_blob(manager, "b", 5, "m1")
        manager.acquire(b.blob_id, "mount-2")
        entries = {e.blob_id: e for e in manager.ls()}
        assert set(entries) == {a.blob_id, b.blob_id}
        assert (entries[a.blob_id].ready_chunks, entries[b.blob_id].ready_chunks) == (3, 5)
        assert entries[a.blob_id].chunk_count == 16
        assert entries[b.blob_id].disk_bytes >= 5 * CHUNK > entries[a.blob_id].disk_bytes - 4096 - 4096
        assert entries[b.blob_id].owners == ("mount-2",) and not entries[a.blob_id].in_use
        assert [e.blob_id for e in manager.ls()] == [a.blob_id, b.blob_id]  # least recently used first
    finally:
        manager.close()


def test_gc_evicts_least_recently_used_unused_blobs(tmp_path: Path) -> None:
    manager = CacheManager(tmp_path)
    try:
        old = _cached_blob(manager, "old", 4, "m")
        busy = _cached_blob(manager, "busy", 4, "m")
        dead = _cached_blob(manager, "dead", 4, "m")
        new = _cached_blob(manager, "new", 4, "m")
        manager.acquire(busy.blob_id, "live-mount")
        manager.acquire(dead.blob_id, "crashed-mount", pid=_dead_pid())
        sizes = {e.blob_id: e.disk_bytes for e in manager.ls()}
        assert manager.gc(sum(sizes.values())) == []
        evicted = manager.gc(sizes[busy.blob_id] + sizes[new.blob_id])
        assert evicted == [old.blob_id, dead.blob_id]
        assert [e.blob_id for e in manager.ls()] == [busy.blob_id, new.blob_id]
        assert not data_path(tmp_path, old).exists() and not map_path(tmp_path, dead).exists()
        assert manager.gc(0) == [new.blob_id]  # busy stays whatever the limit
        assert data_path(tmp_path, busy).exists()
    finally:
        manager.close()


def test_remove_refuses_blobs_in_use_and_index_follows_the_files(tmp_path: Path) -> None:
    manager = CacheManager(tmp_path)
    try:
        blob = _cached_blob(manager, "x", 2, "m")
        manager.acquire(blob.blob_id, "m")
        with pytest.raises(CacheError, match="in use by m"):
            manager.remove(blob.blob_id)
        manager.release(blob.blob_id, "m")
        manager.remove(blob.blob_id)
        assert manager.ls() == []
        orphan, refs, datas = synthetic_blob(8, "orphan")  # written without the index
        cache = BlobCache.open(tmp_path, orphan)
        cache.store(refs[0], datas[0])
        cache.close()
        assert [(e.blob_id, e.ready_chunks) for e in manager.ls()] == [(orphan.blob_id, 1)]
    finally:
        manager.close()
