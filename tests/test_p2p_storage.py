"""The peer piece store: pieces on disk, SQLite state, restarts, truncation, watchers, GC."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from p2p import storage as storage_module
from p2p.pieces import piece_digest
from p2p.storage import PieceInfo, Storage, StorageError

TASK = "a" * 64
OTHER = "b" * 64
PIECE = 1000
CONTENT = 2500  # pieces of 1000, 1000, 500


def blob(number: int, length: int = PIECE) -> bytes:
    return bytes([number + 1]) * length


def piece_data(number: int) -> bytes:
    return blob(number, min(PIECE, CONTENT - number * PIECE))


def write(storage: Storage, task: str, number: int) -> PieceInfo:
    return storage.write_piece(task, number, piece_data(number), parent_id="parent", traffic_type=1, cost_ns=5)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage(tmp_path)
    store.ensure_task(TASK, url="http://o/x", content_length=CONTENT, piece_length=PIECE, download=b"\x0a\x01x")
    return store


def test_write_and_read_pieces(storage: Storage, tmp_path: Path) -> None:
    info = write(storage, TASK, 2)
    assert (info.number, info.offset, info.length, info.digest) == (2, 2000, 500, piece_digest(piece_data(2)))
    assert (info.parent_id, info.traffic_type, info.cost_ns) == ("parent", 1, 5)
    write(storage, TASK, 0)
    assert storage.read_piece(TASK, 2) == piece_data(2) and storage.read_piece(TASK, 0) == piece_data(0)
    assert sorted(storage.pieces(TASK)) == [0, 2]
    task = storage.task(TASK)
    assert task is not None
    assert (task.piece_count, task.finished_pieces, task.state, task.download) == (3, 2, "running", b"\x0a\x01x")
    assert (tmp_path / "content" / "tasks" / "aaa" / TASK).stat().st_size == CONTENT
    assert (tmp_path / "metadata.db").exists()
    with pytest.raises(StorageError, match="1 is not finished"):
        storage.read_piece(TASK, 1)
    with pytest.raises(StorageError, match="2 of 3 pieces"):
        storage.finish_task(TASK)
    write(storage, TASK, 1)
    assert storage.finish_task(TASK).state == "succeeded"
    with storage.content_fd(TASK) as fd:
        assert os.pread(fd, 10, 995) == piece_data(0)[-5:] + piece_data(1)[:5]


def test_bad_writes_are_refused(storage: Storage) -> None:
    with pytest.raises(StorageError, match=f"task {TASK} has no piece 3"):
        write(storage, TASK, 3)
    with pytest.raises(StorageError, match="piece 2 is 500 bytes, got 1000"):
        storage.write_piece(TASK, 2, blob(2), parent_id="", traffic_type=0, cost_ns=0)
    with pytest.raises(StorageError, match=f"unknown task {OTHER}"):
        write(storage, OTHER, 0)
    with pytest.raises(StorageError, match="invalid task id"):
        storage.ensure_task("../x", url="", content_length=1, piece_length=1, download=b"")
    with pytest.raises(StorageError, match="exists with content length 2500"):
        storage.ensure_task(TASK, url="", content_length=2501, piece_length=PIECE, download=b"")
    first = write(storage, TASK, 0)
    again = storage.write_piece(TASK, 0, blob(9), parent_id="other", traffic_type=0, cost_ns=0)
    assert again == first and storage.read_piece(TASK, 0) == piece_data(0)


async def test_write_piece_async(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    info = await storage.write_piece_async(TASK, 2, piece_data(2), parent_id="p", traffic_type=2, cost_ns=1)
    assert info == storage.piece(TASK, 2) and info.digest == piece_digest(piece_data(2))
    assert storage.read_piece(TASK, 2) == piece_data(2)
    assert await storage.write_piece_async(TASK, 2, blob(7, 500), parent_id="", traffic_type=0, cost_ns=0) == info
    with pytest.raises(StorageError, match="1000 bytes, got 500"):
        await storage.write_piece_async(TASK, 0, blob(0, 500), parent_id="", traffic_type=0, cost_ns=0)
    release = threading.Event()
    original = storage_module._write_file

    def held_write(path: Path, data: bytes, offset: int, digest: str | None) -> str:
        release.wait(5)
        return original(path, data, offset, digest)

    monkeypatch.setattr(storage_module, "_write_file", held_write)
    errors: list[StorageError] = []

    async def writer() -> None:
        try:
            await storage.write_piece_async(TASK, 0, piece_data(0), parent_id="", traffic_type=0, cost_ns=0)
        except StorageError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        storage.delete_task(TASK)
        release.set()
    assert len(errors) == 1 and "deleted while piece 0 was written" in str(errors[0])
    assert storage.task(TASK) is None and storage.pieces(TASK) == {}


def test_failed_task_runs_again_keeping_pieces(storage: Storage) -> None:
    write(storage, TASK, 0)
    storage.fail_task(TASK)
    assert storage.task(TASK).state == "failed"  # type: ignore[union-attr]
    again = storage.ensure_task(TASK, url="", content_length=CONTENT, piece_length=PIECE, download=b"")
    assert (again.state, again.finished_pieces) == ("running", 1)


def test_restart_keeps_tasks_and_pieces(storage: Storage, tmp_path: Path) -> None:
    for number in range(3):
        write(storage, TASK, number)
    storage.finish_task(TASK)
    with pytest.raises(StorageError, match="in use"):
        Storage(tmp_path)
    storage.close()
    reopened = Storage(tmp_path)
    task = reopened.task(TASK)
    assert task is not None and (task.state, task.finished_pieces, task.url) == ("succeeded", 3, "http://o/x")
    assert [reopened.read_piece(TASK, n) for n in range(3)] == [piece_data(n) for n in range(3)]
    reopened.close()


def test_truncated_content_is_detected_at_open(storage: Storage, tmp_path: Path) -> None:
    for number in range(3):
        write(storage, TASK, number)
    storage.finish_task(TASK)
    storage.close()
    path = tmp_path / "content" / "tasks" / "aaa" / TASK
    os.truncate(path, 1500)
    orphan = tmp_path / "content" / "tasks" / "ccc" / ("c" * 64)
    orphan.parent.mkdir()
    orphan.write_bytes(b"left behind")
    reopened = Storage(tmp_path)
    task = reopened.task(TASK)
    assert task is not None and (task.state, task.finished_pieces) == ("failed", 1)
    assert sorted(reopened.pieces(TASK)) == [0]
    with pytest.raises(StorageError, match="not finished"):
        reopened.read_piece(TASK, 1)
    assert not orphan.exists()
    reopened.close()


async def collect(storage: Storage, task: str, numbers: list[int] | None, into: list[int]) -> None:
    async for piece in storage.watch(task, numbers):
        into.append(piece.number)


async def test_watch_yields_present_then_new_pieces_and_ends(storage: Storage) -> None:
    write(storage, TASK, 1)
    every: list[int] = []
    some: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, storage, TASK, None, every)
        nursery.start_soon(collect, storage, TASK, [0, 1], some)
        await trio.testing.wait_all_tasks_blocked()
        assert every == [1] and some == [1]
        write(storage, TASK, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert every == [1, 2] and some == [1]
        write(storage, TASK, 0)
    assert every == [1, 2, 0] and some == [1, 0]
    with pytest.raises(StorageError, match="no piece 7"):
        await collect(storage, TASK, [7], [])


async def collect_until_error(storage: Storage, task: str, into: list[int], errors: list[StorageError]) -> None:
    try:
        await collect(storage, task, None, into)
    except StorageError as exc:
        errors.append(exc)


@pytest.mark.parametrize(("action", "message"), [("delete", "was deleted"), ("fail", "failed")])
async def test_watchers_raise_when_the_task_goes(storage: Storage, action: str, message: str) -> None:
    seen: list[int] = []
    errors: list[StorageError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_until_error, storage, TASK, seen, errors)
        await trio.testing.wait_all_tasks_blocked()
        write(storage, TASK, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [0] and not errors
        if action == "delete":
            assert storage.delete_task(TASK)
        else:
            storage.fail_task(TASK)
    assert len(errors) == 1 and message in str(errors[0])
    if action == "delete":
        assert storage.task(TASK) is None and not storage.delete_task(TASK)
        assert not storage.content_path(TASK).exists()


def make_task(storage: Storage, task: str, *, finish: bool) -> None:
    time.sleep(0.002)  # distinct update times
    storage.ensure_task(task, url="", content_length=100, piece_length=100, download=b"")
    storage.write_piece(task, 0, b"x" * 100, parent_id="", traffic_type=0, cost_ns=0)
    if finish:
        storage.finish_task(task)


def test_gc_by_ttl(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    make_task(storage, OTHER, finish=True)
    make_task(storage, TASK, finish=False)
    old, new = (storage.task(t).updated_at for t in (OTHER, TASK))  # type: ignore[union-attr]
    gc = {"ttl": 10.0, "high_percent": 100.0, "low_percent": 100.0, "capacity": 10**9}
    assert storage.collect_garbage(**gc, now=old + 5) == []
    assert storage.collect_garbage(**gc, now=new + 9.999) == [OTHER]
    assert storage.collect_garbage(**gc, now=new + 11) == [TASK]  # running tasks expire too
    assert storage.tasks() == []


def test_gc_by_watermarks_spares_running_tasks(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    ids = [c * 64 for c in "0123"]
    make_task(storage, ids[0], finish=False)  # oldest, but running
    for task in ids[1:]:
        make_task(storage, task, finish=True)
    storage.touch(ids[1])  # now the most recently used: ids[2] is the least
    assert storage.stored_bytes() == 400
    gc = {"ttl": 3600.0, "high_percent": 80.0, "low_percent": 60.0}
    assert storage.collect_garbage(**gc, capacity=1000) == []  # 40 %
    assert storage.collect_garbage(**gc, capacity=500) == [ids[2]]  # 80 % -> 60 %
    assert storage.collect_garbage(**gc, capacity=300) == [ids[3], ids[1]]  # 100 % -> 33 %, running one kept
    assert [t.task_id for t in storage.tasks()] == [ids[0]]
    assert storage.collect_garbage(**gc, capacity=100) == []


def test_gc_by_watermarks_of_the_filesystem(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    make_task(storage, TASK, finish=True)
    make_task(storage, OTHER, finish=False)
    assert storage.collect_garbage(ttl=3600, high_percent=100, low_percent=100) == []
    assert storage.collect_garbage(ttl=3600, high_percent=0, low_percent=0) == [TASK]
    assert [t.task_id for t in storage.tasks()] == [OTHER]
