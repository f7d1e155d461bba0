"""Fetch one piece from a parent's Vortex TCP server and verify it (../shared/docs/dragonfly-protocol.md §2.6)."""

from __future__ import annotations

import contextlib
import mmap
import socket
import threading
import time
from typing import Literal

import trio

from p2p import vortex
from p2p.direct_io import aligned_buffer
from p2p.pieces import MAX_PIECE_LENGTH, crc32
from p2p.ratelimit import RateLimiter

PieceErrorKind = Literal["not_found", "corrupt", "network", "refused"]
CHUNK_SIZE = 512 << 10
MAX_ERROR_VALUE = 64 << 10


class PieceError(Exception):
    """A piece that could not be fetched: ``not_found`` (the parent lacks it), ``corrupt`` (bad reply or digest),
    ``network`` (connection, timeout, truncation) or ``refused`` (any other error frame, e.g. too many uploads)."""

    def __init__(self, kind: PieceErrorKind, message: str, code: vortex.ErrorCode | None = None) -> None:
        super().__init__(message)
        self.kind: PieceErrorKind = kind
        self.code = code


async def download_piece(host: str, port: int, task_id: str, number: int, *, expected_length: int, timeout: float,
                         limiter: RateLimiter | None = None,
                         expected_offset: int | None = None,
                         buffer: mmap.mmap | None = None,
                         threads: trio.CapacityLimiter | None = None) -> tuple[vortex.PieceMetadata, memoryview]:
    """The metadata and verified bytes of piece *number* of *task_id*, fetched within *timeout* seconds.

    The exchange runs on a worker thread with a blocking socket: a few large receives per piece instead of a
    trip through the trio loop per segment burst (which cost more CPU than the bytes). Cancelling closes the
    socket, which ends the thread. The bytes land in *buffer* if it is big enough (a caller fetching piece after
    piece reuses one: fresh memory costs more than the copy), else in a new one; they are valid until the
    buffer is reused. Buffers are page aligned, so storage can write them to disk directly. *threads* bounds the
    worker threads (trio's shared default when None).
    """
    where = f"piece {number} of task {task_id} from {host}:{port}"
    if not 0 <= expected_length <= MAX_PIECE_LENGTH:
        raise ValueError(f"{where}: expected length {expected_length} outside 0..{MAX_PIECE_LENGTH}")
    if buffer is None or len(buffer) < expected_length:
        buffer = aligned_buffer(expected_length)
    fetch = _PieceFetch(where, (host, port), vortex.encode(vortex.Tag.DOWNLOAD_PIECE,
                                                           vortex.download_piece(task_id, number)),
                        time.monotonic() + timeout, limiter if limiter is not None and not limiter.unlimited else None)
    try:
        metadata, data, crc = await trio.to_thread.run_sync(
            fetch.run, number, expected_length, expected_offset, memoryview(buffer)[:expected_length],
            abandon_on_cancel=True, limiter=threads)
    except TimeoutError:
        raise PieceError("network", f"{where}: timed out after {timeout} s") from None
    except OSError as exc:
        raise PieceError("network", f"{where}: {exc or type(exc).__name__}") from None
    except EOFError:
        raise PieceError("network", f"{where}: connection closed early") from None
    finally:
        fetch.abort()
    if f"crc32:{crc}" != metadata.digest:
        raise PieceError("corrupt", f"{where}: content does not match digest {metadata.digest!r}")
    return metadata, data


class _PieceFetch:
    """One DownloadPiece exchange on a blocking socket, run on a worker thread; ``abort`` from the trio side."""

    def __init__(self, where: str, address: tuple[str, int], request: bytes, deadline: float,
                 limiter: RateLimiter | None) -> None:
        self.where = where
        self.address = address
        self.request = request
        self.deadline = deadline
        self.limiter = limiter
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        """End the exchange: a thread blocked on the socket wakes with an error."""
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def run(self, number: int, length: int, offset: int | None,
            view: memoryview) -> tuple[vortex.PieceMetadata, memoryview, int]:
        """Connect, ask, and receive the metadata and the content (with its crc32) into *view*."""
        with socket.create_connection(self.address, timeout=self._remaining()) as sock:
            with self._lock:
                if self._aborted:
                    raise EOFError
                self._sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.request)
            metadata = self._metadata(sock)
            _check(metadata, number, length, offset, self.where)
            return metadata, view, self._content(sock, view)

    def _receive_into(self, sock: socket.socket, view: memoryview, crc: int | None = None) -> int:
        """Fill *view* from *sock*; the crc32 of the bytes, continued from *crc*, computed as they land."""
        while view:
            # poll wakes once the whole rest is queued: a few large receives, not one per segment burst
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(len(view), CHUNK_SIZE))
            sock.settimeout(self._remaining())
            received = sock.recv_into(view)
            if not received:
                raise EOFError
            if crc is not None:
                crc = crc32(view[:received], crc)
            view = view[received:]
        return crc or 0

    def _receive_exactly(self, sock: socket.socket, size: int) -> bytes:
        data = bytearray(size)
        self._receive_into(sock, memoryview(data))
        return bytes(data)

    def _metadata(self, sock: socket.socket) -> vortex.PieceMetadata:
        """The PieceContent metadata; PieceError for an error frame or anything malformed."""
        _, tag, length = vortex.HEADER.unpack(self._receive_exactly(sock, vortex.HEADER.size))
        if tag == vortex.Tag.ERROR and length <= MAX_ERROR_VALUE:
            failure = vortex.parse_error(self._receive_exactly(sock, length))
            kind: PieceErrorKind = "not_found" if failure.code is vortex.ErrorCode.NOT_FOUND else "refused"
            raise PieceError(kind, f"{self.where}: {failure.code.name} {failure}", failure.code)
        if tag != vortex.Tag.PIECE_CONTENT or length > vortex.MAX_PIECE_CONTENT_VALUE:
            raise PieceError("corrupt", f"{self.where}: unexpected reply, tag {tag} of {length} bytes")
        try:
            return vortex.PieceMetadata.decode(self._receive_exactly(sock, length))
        except vortex.VortexError as exc:
            raise PieceError("corrupt", f"{self.where}: {exc}") from None

    def _content(self, sock: socket.socket, view: memoryview) -> int:
        """The raw piece bytes into *view*, drawn from the limiter chunk by chunk; their crc32."""
        crc = 0
        for start in range(0, len(view), CHUNK_SIZE):
            chunk = view[start : start + CHUNK_SIZE]
            if self.limiter is not None:
                trio.from_thread.run(self.limiter.acquire, len(chunk))
            crc = self._receive_into(sock, chunk, crc)
        return crc


def _check(metadata: vortex.PieceMetadata, number: int, length: int, offset: int | None, where: str) -> None:
    """PieceError unless the reply describes the piece asked for."""
    wanted = (number, length, metadata.offset if offset is None else offset)
    got = (metadata.number, metadata.length, metadata.offset)
    if got != wanted:
        raise PieceError("corrupt", f"{where}: reply describes (number, length, offset) {got}, wanted {wanted}")
