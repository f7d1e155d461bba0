"""Fetch one piece from a parent's Vortex TCP server and verify it (../shared/docs/dragonfly-protocol.md §2.6)."""

from __future__ import annotations

import mmap
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
                         buffer: mmap.mmap | None = None) -> tuple[vortex.PieceMetadata, memoryview]:
    """The metadata and verified bytes of piece *number* of *task_id*, fetched within *timeout* seconds.

    The bytes land in *buffer* if it is big enough (a caller fetching piece after piece reuses one: fresh
    memory costs more than the copy), else in a new one; they are valid until the buffer is reused. Buffers
    are page aligned, so storage can write them to disk directly.
    """
    where = f"piece {number} of task {task_id} from {host}:{port}"
    if not 0 <= expected_length <= MAX_PIECE_LENGTH:
        raise ValueError(f"{where}: expected length {expected_length} outside 0..{MAX_PIECE_LENGTH}")
    request = vortex.encode(vortex.Tag.DOWNLOAD_PIECE, vortex.download_piece(task_id, number))
    try:
        with trio.fail_after(timeout):
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(request)
                metadata = await _receive_metadata(stream, where)
                _check(metadata, number, expected_length, expected_offset, where)
                data, crc = await _receive_content(stream, expected_length, limiter, buffer)
    except trio.TooSlowError:
        raise PieceError("network", f"{where}: timed out after {timeout} s") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PieceError("network", f"{where}: {exc or type(exc).__name__}") from None
    except EOFError:
        raise PieceError("network", f"{where}: connection closed early") from None
    if f"crc32:{crc}" != metadata.digest:
        raise PieceError("corrupt", f"{where}: content does not match digest {metadata.digest!r}")
    return metadata, data


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


async def _receive_metadata(stream: trio.SocketStream, where: str) -> vortex.PieceMetadata:
    """The PieceContent metadata; PieceError for an error frame or anything malformed."""
    _, tag, length = vortex.HEADER.unpack(await _receive_exactly(stream, vortex.HEADER.size))
    if tag == vortex.Tag.ERROR and length <= MAX_ERROR_VALUE:
        failure = vortex.parse_error(await _receive_exactly(stream, length))
        kind: PieceErrorKind = "not_found" if failure.code is vortex.ErrorCode.NOT_FOUND else "refused"
        raise PieceError(kind, f"{where}: {failure.code.name} {failure}", failure.code)
    if tag != vortex.Tag.PIECE_CONTENT or length > vortex.MAX_PIECE_CONTENT_VALUE:
        raise PieceError("corrupt", f"{where}: unexpected reply, tag {tag} of {length} bytes")
    try:
        return vortex.PieceMetadata.decode(await _receive_exactly(stream, length))
    except vortex.VortexError as exc:
        raise PieceError("corrupt", f"{where}: {exc}") from None


def _check(metadata: vortex.PieceMetadata, number: int, length: int, offset: int | None, where: str) -> None:
    """PieceError unless the reply describes the piece asked for."""
    wanted = (number, length, metadata.offset if offset is None else offset)
    got = (metadata.number, metadata.length, metadata.offset)
    if got != wanted:
        raise PieceError("corrupt", f"{where}: reply describes (number, length, offset) {got}, wanted {wanted}")


async def _receive_content(stream: trio.SocketStream, length: int, limiter: RateLimiter | None,
                           buffer: mmap.mmap | None) -> tuple[memoryview, int]:
    """*length* raw bytes (into *buffer* when given, reused across pieces), drawn from *limiter* chunk by chunk,
    and their crc32, computed as each chunk lands while it is still in the CPU cache."""
    if buffer is None or len(buffer) < length:
        buffer = aligned_buffer(length)
    view = memoryview(buffer)[:length]
    done = crc = 0
    while done < length:
        size = min(CHUNK_SIZE, length - done)
        if limiter is not None:
            await limiter.acquire(size)
        end = done + size
        while done < end:
            received = await stream.socket.recv_into(view[done:end])
            if not received:
                raise EOFError
            crc = crc32(view[done : done + received], crc)
            done += received
    return view, crc
