"""Vortex piece transfer: PieceContent metadata, and the TCP server and client over 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2p import vortex
from p2p.piece_client import PieceError, download_piece
from p2p.piece_server import UploadStats, serve_pieces
from p2p.pieces import piece_digest
from p2p.ratelimit import RateLimiter
from p2p.storage import Storage

TASK = "d" * 64
PIECE = 256 << 10
CONTENT = 2 * PIECE + 1234
META = vortex.PieceMetadata(3, 3 * PIECE, PIECE, "crc32:907060870", "10.0.0.1-host-uuid", 1, 7, 1_700_000_000)


def test_piece_metadata_layout_and_round_trip() -> None:
    value = META.encode()
    digest, parent = META.digest.encode(), META.parent_id.encode()
    expected_body = (struct.pack(">IQQI", 3, 3 * PIECE, PIECE, len(digest)) + digest + struct.pack(">I", len(parent))
                     + parent + struct.pack(">BQq", 1, 7, 1_700_000_000))
    assert value == struct.pack(">I", len(expected_body)) + expected_body
    assert vortex.PieceMetadata.decode(value) == META
    negative = vortex.PieceMetadata(0, 0, 0, "", "", 0, 0, -1)
    assert vortex.PieceMetadata.decode(negative.encode()) == negative


def test_piece_metadata_hostile_decoding() -> None:
    value = META.encode()
    for cut in range(len(value)):
        with pytest.raises(vortex.VortexError):
            vortex.PieceMetadata.decode(value[:cut])
    body = value[4:]
    fixed = 4 + 8 + 8
    huge_digest = struct.pack(">I", len(body)) + body[:fixed] + struct.pack(">I", 1 << 31) + body[fixed + 4:]
    with pytest.raises(vortex.VortexError, match="exceeds"):
        vortex.PieceMetadata.decode(huge_digest)
    bad_utf8 = value.replace(b"crc32", b"\xffrc32")
    with pytest.raises(vortex.VortexError, match="not UTF-8"):
        vortex.PieceMetadata.decode(bad_utf8)
    with pytest.raises(vortex.VortexError, match="trailing"):
        vortex.PieceMetadata.decode(struct.pack(">I", len(body) + 1) + body + b"!")
    with pytest.raises(vortex.VortexError, match="disagrees"):
        vortex.PieceMetadata.decode(struct.pack(">I", len(body) + 9) + body)
    with pytest.raises(vortex.VortexError, match="exceeds"):
        vortex.PieceMetadata.decode(bytes(vortex.MAX_PIECE_CONTENT_VALUE + 1))
    with pytest.raises(vortex.VortexError, match="out of range"):
        vortex.PieceMetadata(1 << 32, 0, 0, "", "", 0, 0, 0).encode()
    with pytest.raises(vortex.VortexError, match="too long"):
        vortex.PieceMetadata(1, 0, 0, "x" * 300, "", 0, 0, 0).encode()


@given(st.binary(max_size=200))
def test_piece_metadata_rejects_garbage_cleanly(data: bytes) -> None:
    with contextlib.suppress(vortex.VortexError):
        vortex.PieceMetadata.decode(data)


def test_upload_stats_rate_window() -> None:
    stats = UploadStats(window=4)
    stats.record(400, now=100.2)
    stats.record(400, now=101.5)
    assert stats.bytes_sent == 800 and stats.rate(now=102) == 200
    assert stats.rate(now=104.5) == 100 and stats.rate(now=106) == 0


def content() -> bytes:
    return os.urandom(CONTENT)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[tuple[Storage, bytes]]:
    store = Storage(tmp_path)
    data = content()
    store.ensure_task(TASK, url="http://o/x", content_length=CONTENT, piece_length=PIECE, download=b"")
    for number in range(3):
        store.write_piece(TASK, number, data[number * PIECE : (number + 1) * PIECE], parent_id="10.0.0.9-p",
                          traffic_type=0, cost_ns=2_500_000_000)
    yield store, data
    store.close()


async def start(nursery: trio.Nursery, store: Storage, *, rate: float = 0, max_uploads: int = 8,
                stats: UploadStats | None = None) -> int:
    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_pieces(store, "127.0.0.1", 0, limiter=RateLimiter(rate), max_uploads=max_uploads,
                           stats=stats or UploadStats(), task_status=task_status)

    port: int = await nursery.start(run)
    return port


def span(number: int) -> tuple[int, int]:
    return number * PIECE, min(PIECE, CONTENT - number * PIECE)


async def test_round_trip_of_every_piece(storage: tuple[Storage, bytes], nursery: trio.Nursery) -> None:
    store, data = storage
    stats = UploadStats()
    port = await start(nursery, store, stats=stats)
    for number in (2, 0, 1):
        offset, length = span(number)
        meta, got = await download_piece("127.0.0.1", port, TASK, number, expected_length=length, timeout=5,
                                         limiter=RateLimiter(0), expected_offset=offset)
        assert got == data[offset : offset + length]
        assert (meta.number, meta.offset, meta.length, meta.digest) == (number, offset, length, piece_digest(got))
        assert (meta.parent_id, meta.traffic_type, meta.cost_secs) == ("10.0.0.9-p", 1, 2)
    assert (stats.bytes_sent, stats.pieces_sent, stats.active) == (CONTENT, 3, 0) and stats.rate() > 0


async def test_missing_pieces_are_not_found(storage: tuple[Storage, bytes], nursery: trio.Nursery) -> None:
    store, _ = storage
    store.ensure_task("e" * 64, url="", content_length=10, piece_length=10, download=b"")
    port = await start(nursery, store)
    for task in ("e" * 64, "f" * 64):
        with pytest.raises(PieceError, match=f"piece 0 of task {task} from 127.0.0.1:{port}.*not found") as info:
            await download_piece("127.0.0.1", port, task, 0, expected_length=10, timeout=5)
        assert info.value.kind == "not_found" and info.value.code is vortex.ErrorCode.NOT_FOUND


async def read_frame(stream: trio.SocketStream) -> vortex.Frame:
    header = b""
    while len(header) < vortex.HEADER.size:
        header += await stream.receive_some(vortex.HEADER.size - len(header))
    _, _, length = vortex.decode_header(header)
    value = b""
    while len(value) < length:
        value += await stream.receive_some(length - len(value))
    return vortex.decode(header + value)


async def hung_up(stream: trio.SocketStream) -> bool:
    """Whether the other side closed (unread request bytes make its close a reset)."""
    try:
        return await stream.receive_some(1) == b""
    except trio.BrokenResourceError:
        return True


async def test_malformed_requests_get_error_frames(storage: tuple[Storage, bytes], nursery: trio.Nursery) -> None:
    store, data = storage
    port = await start(nursery, store)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(vortex.encode(vortex.Tag.DOWNLOAD_PIECE, b"\xff" * 64 + bytes(4), frame_id=5))
        frame = await read_frame(stream)
        assert (frame.id, frame.tag) == (5, vortex.Tag.ERROR)
        assert vortex.parse_error(frame.value).code is vortex.ErrorCode.INVALID_ARGUMENT
        await stream.send_all(vortex.encode(vortex.Tag.DOWNLOAD_PIECE, vortex.download_piece(TASK, 2)))
        frame = await read_frame(stream)  # the same connection serves a good request next
        assert vortex.PieceMetadata.decode(frame.value).length == span(2)[1]
    for bad in (vortex.encode(vortex.Tag.PIECE_CONTENT, b"x"), vortex.encode(vortex.Tag.DOWNLOAD_PIECE, b"short"),
                bytes([1, 0]) + (1 << 31).to_bytes(4, "big")):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(bad)
            frame = await read_frame(stream)
            assert vortex.parse_error(frame.value).code is vortex.ErrorCode.INVALID_ARGUMENT
            assert await hung_up(stream)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x00\x00")  # a partial header, then a hang-up
    _, got = await download_piece("127.0.0.1", port, TASK, 0, expected_length=PIECE, timeout=5)
    assert got == data[:PIECE]


async def test_corrupt_content_is_detected(storage: tuple[Storage, bytes], nursery: trio.Nursery) -> None:
    store, _ = storage
    port = await start(nursery, store)
    with open(store.content_path(TASK), "r+b") as file:
        file.seek(PIECE + 100)
        file.write(b"\x00corrupted\x00")
    with pytest.raises(PieceError, match=f"piece 1 of task {TASK} from 127.0.0.1:{port}.*digest") as info:
        await download_piece("127.0.0.1", port, TASK, 1, expected_length=PIECE, timeout=5)
    assert info.value.kind == "corrupt"
    with pytest.raises(PieceError, match="wanted") as info:
        await download_piece("127.0.0.1", port, TASK, 0, expected_length=PIECE, timeout=5, expected_offset=1)
    assert info.value.kind == "corrupt"


async def test_dead_servers_are_network_errors() -> None:
    with trio.socket.socket() as silent:  # accepts connections (backlog) but never answers
        await silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with trio.fail_after(3):
            with pytest.raises(PieceError, match=r"timed out after 0\.3 s") as info:
                await download_piece("127.0.0.1", port, TASK, 0, expected_length=10, timeout=0.3)
    assert info.value.kind == "network"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(PieceError, match=f"127.0.0.1:{port}") as info:
        await download_piece("127.0.0.1", port, TASK, 0, expected_length=10, timeout=3)
    assert info.value.kind == "network"


async def test_uploads_beyond_the_limit_are_refused(storage: tuple[Storage, bytes], nursery: trio.Nursery) -> None:
    store, _ = storage
    stats = UploadStats()
    port = await start(nursery, store, rate=64 << 10, max_uploads=1, stats=stats)  # a piece takes ~4 s
    slow = trio.CancelScope()

    async def hold_the_slot() -> None:
        with slow:
            await download_piece("127.0.0.1", port, TASK, 0, expected_length=PIECE, timeout=30)

    nursery.start_soon(hold_the_slot)
    with trio.fail_after(3):
        while stats.active < 1:
            await trio.sleep(0.01)
    with pytest.raises(PieceError, match="too many uploads") as info:
        await download_piece("127.0.0.1", port, TASK, 1, expected_length=PIECE, timeout=5)
    assert info.value.kind == "refused" and info.value.code is vortex.ErrorCode.INTERNAL
    slow.cancel()


async def test_upload_rate_stays_within_the_limit(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = Storage(tmp_path)
    limit, piece, count = 4_000_000, 4 << 20, 4  # ~16.8 MB at 4 MB/s
    store.ensure_task(TASK, url="", content_length=piece * count, piece_length=piece, download=b"")
    payload = os.urandom(piece)
    for number in range(count):
        store.write_piece(TASK, number, payload, parent_id="", traffic_type=0, cost_ns=0)
    stats = UploadStats()
    port = await start(nursery, store, rate=limit, stats=stats)
    started = trio.current_time()
    async with trio.open_nursery() as clients:  # concurrent clients share the server's limit
        for number in range(count):
            clients.start_soon(lambda n: download_piece("127.0.0.1", port, TASK, n, expected_length=piece,
                                                        timeout=30), number)
    elapsed = trio.current_time() - started
    measured = piece * count / elapsed
    assert stats.bytes_sent == piece * count
    assert 0.5 * limit < measured <= 1.1 * limit, f"{measured / 1e6:.2f} MB/s against a {limit / 1e6} MB/s limit"
    store.close()
