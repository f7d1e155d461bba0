"""The Vortex TCP server that uploads finished pieces to other peers (../shared/docs/dragonfly-protocol.md §2.6).

A connection sends DownloadPiece requests, one at a time (Dragonfly sends one per connection). Each is answered
with a PieceContent frame followed by the raw piece bytes in 1 MiB chunks, each drawn from the upload limiter, then
read with ``O_DIRECT`` into a reused buffer and sent, both on a worker thread (content files are written past the
page cache, so ``sendfile`` would fill fresh page cache first: several times the CPU of the read and the send), or
with an error frame: NOT_FOUND for an unknown task or unfinished piece, INVALID_ARGUMENT for a malformed request,
INTERNAL otherwise. When ``max_uploads`` pieces
are in flight the request is refused with INTERNAL and a message starting "too many uploads" (Vortex has no busy
code). A frame the server cannot resynchronise after (bad header, tag or length) closes the connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import select
import socket
import time
from dataclasses import dataclass, field

import trio

from p2p import vortex
from p2p.direct_io import ALIGN, aligned_buffer, read_into
from p2p.ratelimit import RateLimiter
from p2p.storage import PieceInfo, Storage, StorageError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
REQUEST_TIMEOUT = 30.0  # waiting for a request, or for a client to take a chunk
POLL_SLICE_MS = 200  # an upload thread waiting for room checks for cancellation this often
SUPER_SEED_HOLD = 5.0  # seconds a super-seed waits before handing the same piece out again
REMOTE_PEER = 1  # common.v2.TrafficType.REMOTE_PEER, as Dragonfly's server reports
_REQUEST_SIZE = vortex.TASK_ID_LENGTH + 4


class UploadStats:
    """Upload counters: bytes sent, pieces in flight, and the rate over the last *window* seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.bytes_sent = 0
        self.pieces_sent = 0
        self.active = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (second, bytes)

    def record(self, amount: int, now: float | None = None) -> None:
        """Count *amount* bytes sent."""
        second = float(int(time.monotonic() if now is None else now))
        self.bytes_sent += amount
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1] = (second, self._recent[-1][1] + amount)
        else:
            self._recent.append((second, amount))
        self._expire(second)

    def rate(self, now: float | None = None) -> float:
        """Bytes per second sent over the last window."""
        self._expire(time.monotonic() if now is None else now)
        return sum(amount for _, amount in self._recent) / self.window

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.window:
            self._recent.popleft()


async def _listen(host: str, port: int) -> trio.SocketListener:
    family, kind, proto, _, address = (await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
    sock = trio.socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(address)
    sock.listen(1024)
    return trio.SocketListener(sock)


async def serve_pieces(storage: Storage, host: str, port: int, *, limiter: RateLimiter, max_uploads: int,
                       stats: UploadStats, super_seed: bool = False,
                       task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve pieces on *host*:*port* (0 picks a port, reported through ``task_status.started``) until cancelled.

    With *super_seed* (seed peers), a piece of a task still being fetched from the source is handed out once
    per ``SUPER_SEED_HOLD`` seconds: other children are told NOT_FOUND and get it from the peer that has it,
    so the seed's upload carries each piece about once (BitTorrent's super-seeding).
    """
    listener = await _listen(host, port)
    server = _Server(storage, limiter, max_uploads, stats, super_seed, trio.CapacityLimiter(max_uploads))
    async with listener, trio.open_nursery() as nursery:
        task_status.started(listener.socket.getsockname()[1])
        await trio.serve_listeners(server.handle, [listener], handler_nursery=nursery)


@dataclass(frozen=True, slots=True)
class _Server:
    storage: Storage
    limiter: RateLimiter
    max_uploads: int
    stats: UploadStats
    super_seed: bool
    threads: trio.CapacityLimiter  # for uploads only: slow children must not starve downloads and storage
    handed_out: dict[tuple[str, int], float] = field(default_factory=dict)  # (task, piece) -> when
    buffers: list[mmap.mmap] = field(default_factory=list)  # aligned read buffers not in use

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until the client closes it, errs or idles; nothing escapes to the server."""
        try:
            async with stream:
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while await self._serve_request(stream):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("vortex connection failed")

    async def _serve_request(self, stream: trio.SocketStream) -> bool:
        """Answer one request; whether the connection may carry another."""
        header = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            header = await _receive_exactly(stream, vortex.HEADER.size)
        if header is None or len(header) < vortex.HEADER.size:
            return False
        ident, tag, length = vortex.HEADER.unpack(header)
        if tag != vortex.Tag.DOWNLOAD_PIECE or length != _REQUEST_SIZE:
            await _send_error(stream, ident, vortex.ErrorCode.INVALID_ARGUMENT,
                              f"expected a {_REQUEST_SIZE}-byte download-piece request, got tag {tag} "
                              f"with {length} bytes")
            return False
        with trio.fail_after(REQUEST_TIMEOUT):
            value = await _receive_exactly(stream, length)
        if value is None or len(value) < length:
            return False
        try:
            task_id, number = vortex.parse_download_piece(value)
        except vortex.VortexError as exc:
            await _send_error(stream, ident, vortex.ErrorCode.INVALID_ARGUMENT, str(exc))
            return True
        await self._upload(stream, ident, task_id, number)
        return True

    async def _upload(self, stream: trio.SocketStream, ident: int, task_id: str, number: int) -> None:
        if self.stats.active >= self.max_uploads:
            await _send_error(stream, ident, vortex.ErrorCode.INTERNAL,
                              f"too many uploads: {self.stats.active} in flight, limit {self.max_uploads}")
            return
        piece = self.storage.piece(task_id, number)
        if piece is None:
            await _send_error(stream, ident, vortex.ErrorCode.NOT_FOUND, f"piece {task_id}-{number} not found")
            return
        if self._held_back(task_id, number):
            await _send_error(stream, ident, vortex.ErrorCode.NOT_FOUND,
                              f"piece {task_id}-{number} was just handed to another peer: fetch it from the peers")
            return
        with contextlib.ExitStack() as stack:
            try:
                fd = stack.enter_context(self.storage.content_fd(task_id, direct=True))
            except StorageError as exc:
                await _send_error(stream, ident, vortex.ErrorCode.INTERNAL, str(exc))
                return
            self.stats.active += 1
            try:
                await self._send_piece(stream, ident, fd, task_id, piece)
            finally:
                self.stats.active -= 1

    def _held_back(self, task_id: str, number: int) -> bool:
        """Super-seeding: whether this piece went to another child moments ago, while the task still runs."""
        if not self.super_seed:
            return False
        task = self.storage.task(task_id)
        if task is None or task.state != "running":
            self.handed_out.pop((task_id, number), None)
            return False
        now = trio.current_time()
        if now - self.handed_out.get((task_id, number), -SUPER_SEED_HOLD) < SUPER_SEED_HOLD:
            return True
        self.handed_out[(task_id, number)] = now
        return False

    async def _send_piece(self, stream: trio.SocketStream, ident: int, fd: int, task_id: str,
                          piece: PieceInfo) -> None:
        """The PieceContent frame, then the piece bytes chunk by chunk within the upload limit."""
        metadata = vortex.PieceMetadata(piece.number, piece.offset, piece.length, piece.digest, piece.parent_id,
                                        REMOTE_PEER, piece.cost_ns // 1_000_000_000, int(piece.created_at))
        self.storage.touch(task_id)
        await stream.send_all(vortex.encode(vortex.Tag.PIECE_CONTENT, metadata.encode(), ident))
        what = f"piece {task_id}-{piece.number}"
        buffer = self.buffers.pop() if self.buffers else aligned_buffer(CHUNK_SIZE + 2 * ALIGN)
        try:
            done = 0
            while done < piece.length:
                size = min(CHUNK_SIZE, piece.length - done)
                await self.limiter.acquire(size)
                try:
                    await trio.to_thread.run_sync(_read_and_send, fd, stream.socket.fileno(), buffer,
                                                  piece.offset + done, size, limiter=self.threads)
                except _Truncated:
                    log.warning("upload of %s failed: the content file is truncated", what)
                    raise trio.BrokenResourceError(f"{what}: the content file is truncated") from None
                except OSError as exc:  # the client went away, or stalled past the timeout
                    raise trio.BrokenResourceError(f"{what}: {exc or type(exc).__name__}") from None
                done += size
                self.stats.record(size)
        finally:
            self.buffers.append(buffer)  # reused: fresh memory costs more than the read
        self.stats.pieces_sent += 1


class _Truncated(Exception):
    """The content file ended inside a finished piece."""


def _read_and_send(fd: int, sock: int, buffer: mmap.mmap, offset: int, size: int) -> None:
    """Read *size* bytes at *offset* of *fd* and send them all on the non-blocking socket *sock*, waiting for
    room with poll (a worker thread's few large sends cost far less than trio's loop per partial send).
    Gives up when the chunk is not sent within ``REQUEST_TIMEOUT``, and soon after the calling trio task is
    cancelled."""
    data = read_into(fd, buffer, offset, size)
    if len(data) < size:
        raise _Truncated
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while data:
        try:
            data = data[os.write(sock, data) :]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no room to send for {REQUEST_TIMEOUT:.0f} s") from None
            poller.poll(POLL_SLICE_MS)
            trio.from_thread.check_cancelled()


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    """*size* bytes, fewer if the peer closed midway, None if it closed before sending any."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return bytes(data) if data else None
        data += chunk
    return bytes(data)


async def _send_error(stream: trio.SocketStream, ident: int, code: vortex.ErrorCode, message: str) -> None:
    with trio.fail_after(REQUEST_TIMEOUT):
        await stream.send_all(vortex.encode(vortex.Tag.ERROR, vortex.error(code, message), ident))
