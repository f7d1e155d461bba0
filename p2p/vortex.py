"""Vortex, Dragonfly's piece transfer framing on TCP: ``id:u8 | tag:u8 | length:u32 BE | value``.

Requests (tag 0) carry the 64-character task id and a u32 BE piece number; errors (tag 255) a u8 code
and a UTF-8 message. Frames from the network are hostile: lengths are capped and checked.

PieceContent (tag 1), the reply to a request: the header length counts only the value
``metadata_len:u32 | number:u32 | offset:u64 | length:u64 | digest_len:u32 | digest | parent_id_len:u32 |
parent_id | traffic_type:u8 | cost_secs:u64 | created_at_unix:i64`` (all big endian, ``metadata_len`` counting
what follows it); the ``length`` raw piece bytes come after the frame, uncounted. Checked against
dragonflyoss/vortex-protocol src/tlv/piece_content.rs at 3bca5de65a6a4a26c4014cb04fd55ef704772a92 and
dragonflyoss/client dragonfly-client-storage/src/{server,client}/tcp.rs at
ff17c0b771f69aa801910ba96b7058abad24dbf2 (the server sets the header length to ``4 + metadata_len``; the
client reads ``metadata_len`` itself). Unlike Dragonfly's decoder, trailing metadata bytes are refused.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BBI")
MAX_VALUE_SIZE = 64 << 20 | 4096  # a 64 MiB piece plus its metadata
TASK_ID_LENGTH = 64
MAX_DIGEST_LENGTH = 256
MAX_PARENT_ID_LENGTH = 1024
_FIXED = struct.Struct(">IQQ")  # number, offset, length
_LEN = struct.Struct(">I")
_TAIL = struct.Struct(">BQq")  # traffic_type, cost_secs, created_at_unix
MAX_PIECE_CONTENT_VALUE = (_LEN.size + _FIXED.size + _LEN.size + MAX_DIGEST_LENGTH + _LEN.size
                           + MAX_PARENT_ID_LENGTH + _TAIL.size)


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


@dataclass(frozen=True, slots=True)
class PieceMetadata:
    """The metadata block of a PieceContent frame; ``length`` raw bytes follow the frame."""

    number: int
    offset: int
    length: int
    digest: str
    parent_id: str
    traffic_type: int
    cost_secs: int
    created_at: int  # unix seconds

    def encode(self) -> bytes:
        """The frame value: ``metadata_len`` then the metadata."""
        digest, parent = self.digest.encode(), self.parent_id.encode()
        if len(digest) > MAX_DIGEST_LENGTH or len(parent) > MAX_PARENT_ID_LENGTH:
            raise VortexError(f"piece {self.number}: digest or parent id too long")
        try:
            body = b"".join((_FIXED.pack(self.number, self.offset, self.length), _LEN.pack(len(digest)), digest,
                             _LEN.pack(len(parent)), parent,
                             _TAIL.pack(self.traffic_type, self.cost_secs, self.created_at)))
        except struct.error as exc:
            raise VortexError(f"piece {self.number}: field out of range: {exc}") from None
        return _LEN.pack(len(body)) + body

    @classmethod
    def decode(cls, value: bytes) -> PieceMetadata:
        """Parse a PieceContent frame value, refusing anything malformed."""
        if len(value) > MAX_PIECE_CONTENT_VALUE:
            raise VortexError(f"piece metadata of {len(value)} bytes exceeds {MAX_PIECE_CONTENT_VALUE}")
        reader = _Reader(value)
        if reader.u32("metadata length") != len(value) - _LEN.size:
            raise VortexError(f"metadata length disagrees with the {len(value)}-byte frame value")
        number, offset, length = reader.unpack(_FIXED, "number, offset and length")
        digest = reader.text(MAX_DIGEST_LENGTH, "digest")
        parent_id = reader.text(MAX_PARENT_ID_LENGTH, "parent id")
        traffic_type, cost_secs, created_at = reader.unpack(_TAIL, "traffic type, cost and created_at")
        if reader.pos != len(value):
            raise VortexError(f"{len(value) - reader.pos} trailing bytes after piece metadata")
        return cls(number, offset, length, digest, parent_id, traffic_type, cost_secs, created_at)


class _Reader:
    """Bounds-checked sequential reads over a hostile byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise VortexError(f"truncated piece metadata: {what} needs {size} bytes, "
                              f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        values: tuple[int, ...] = layout.unpack(self.take(layout.size, what))
        return values

    def u32(self, what: str) -> int:
        return self.unpack(_LEN, what)[0]

    def text(self, cap: int, what: str) -> str:
        size = self.u32(f"{what} length")
        if size > cap:
            raise VortexError(f"{what} of {size} bytes exceeds {cap}")
        try:
            return self.take(size, what).decode()
        except UnicodeDecodeError:
            raise VortexError(f"{what} is not UTF-8") from None
