"""Vortex, Dragonfly's piece transfer framing on TCP: ``id:u8 | tag:u8 | length:u32 BE | value``.

Requests (tag 0) carry the 64-character task id and a u32 BE piece number; errors (tag 255) a u8 code
and a UTF-8 message. Frames from the network are hostile: lengths are capped and checked.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BBI")
MAX_VALUE_SIZE = 64 << 20 | 4096  # a 64 MiB piece plus its metadata
TASK_ID_LENGTH = 64


class Tag(enum.IntEnum):
    """Frame types."""

    DOWNLOAD_PIECE = 0
    PIECE_CONTENT = 1
    CLOSE = 254
    ERROR = 255


class ErrorCode(enum.IntEnum):
    """Codes of error frames."""

    UNKNOWN = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    INTERNAL = 3


class VortexError(Exception):
    """A malformed frame, or an error frame from the other side."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    id: int
    tag: int
    value: bytes


def encode(tag: Tag, value: bytes, frame_id: int | None = None) -> bytes:
    """A frame with a random id unless one is given."""
    if len(value) > MAX_VALUE_SIZE:
        raise VortexError(f"frame value of {len(value)} bytes exceeds {MAX_VALUE_SIZE}")
    ident = os.urandom(1)[0] if frame_id is None else frame_id
    return HEADER.pack(ident, tag, len(value)) + value


def decode_header(header: bytes) -> tuple[int, int, int]:
    """``(id, tag, length)`` of a 6-byte header, refusing oversized lengths."""
    if len(header) != HEADER.size:
        raise VortexError(f"truncated frame header ({len(header)} of {HEADER.size} bytes)")
    ident, tag, length = HEADER.unpack(header)
    if length > MAX_VALUE_SIZE:
        raise VortexError(f"frame claims {length} bytes, more than {MAX_VALUE_SIZE}")
    return ident, tag, length


def decode(data: bytes) -> Frame:
    """A whole frame held in *data* (header plus exactly its value)."""
    ident, tag, length = decode_header(data[: HEADER.size])
    value = data[HEADER.size :]
    if len(value) != length:
        raise VortexError(f"frame value is {len(value)} bytes, header says {length}")
    return Frame(ident, tag, value)


def download_piece(task: str, number: int) -> bytes:
    """The value of a DownloadPiece request."""
    raw = task.encode("ascii")
    if len(raw) != TASK_ID_LENGTH or not 0 <= number < 1 << 32:
        raise VortexError(f"cannot request piece {number} of task {task!r}: task ids are 64 characters")
    return raw + struct.pack(">I", number)


def parse_download_piece(value: bytes) -> tuple[str, int]:
    """``(task_id, piece number)`` from a DownloadPiece value."""
    if len(value) != TASK_ID_LENGTH + 4:
        raise VortexError(f"download-piece request of {len(value)} bytes, expected {TASK_ID_LENGTH + 4}")
    try:
        task = value[:TASK_ID_LENGTH].decode("ascii")
    except UnicodeDecodeError:
        raise VortexError("download-piece request has a non-ASCII task id") from None
    return task, struct.unpack(">I", value[TASK_ID_LENGTH:])[0]


def error(code: ErrorCode, message: str) -> bytes:
    """The value of an error frame."""
    return bytes([code]) + message.encode()


def parse_error(value: bytes) -> VortexError:
    """The exception an error frame reports."""
    if not value:
        return VortexError("empty error frame", ErrorCode.UNKNOWN)
    code = ErrorCode(value[0]) if value[0] in ErrorCode._value2member_map_ else ErrorCode.UNKNOWN
    return VortexError(value[1:].decode("utf-8", "replace"), code)
