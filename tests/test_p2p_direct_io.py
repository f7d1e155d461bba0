"""p2p.direct_io: content writes and reads past the page cache, with the buffered fallback."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from p2p import direct_io
from p2p.direct_io import ALIGN, aligned_buffer, open_direct, read_into, write_at

DATA = os.urandom(3 * ALIGN * 256 + 1234)  # several MiB-ish blocks plus a ragged tail


def cached_bytes(path: Path) -> int:
    """Bytes of *path* in the page cache, by util-linux fincore."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


def fresh_file(path: Path, size: int = 0) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


@pytest.mark.parametrize("offset", [0, ALIGN * 3, 100])
@pytest.mark.parametrize("kind", ["aligned", "bytes", "bytearray"])
def test_write_at_stores_every_byte(tmp_path: Path, offset: int, kind: str) -> None:
    path = fresh_file(tmp_path / "content")
    data: bytes | bytearray | memoryview
    if kind == "aligned":
        buffer = aligned_buffer(len(DATA))
        buffer[: len(DATA)] = DATA
        data = memoryview(buffer)[: len(DATA)]
    else:
        data = DATA if kind == "bytes" else bytearray(DATA)
    write_at(path, data, offset)
    assert path.read_bytes() == b"\0" * offset + DATA


def test_aligned_writes_and_reads_bypass_the_page_cache(tmp_path: Path) -> None:
    path = fresh_file(tmp_path / "content")
    fd, direct = open_direct(path, os.O_RDONLY)
    os.close(fd)
    if not direct:
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    body = len(DATA) // ALIGN * ALIGN
    write_at(path, DATA, 0)
    assert cached_bytes(path) <= ALIGN  # only the ragged tail went through the page cache
    fd, _ = open_direct(path, os.O_RDONLY)
    try:
        buffer = aligned_buffer(body + 2 * ALIGN)
        assert bytes(read_into(fd, buffer, 0, body)) == DATA[:body]
    finally:
        os.close(fd)
    assert cached_bytes(path) <= ALIGN


@pytest.mark.parametrize(("offset", "length"), [(0, 5000), (ALIGN - 1, 2), (12345, 3 * ALIGN), (len(DATA) - 10, 10),
                                                (len(DATA) - 10, 100), (len(DATA), 10), (len(DATA) + ALIGN, 1)])
def test_read_into_returns_the_asked_bytes_and_stops_at_the_end(tmp_path: Path, offset: int, length: int) -> None:
    path = tmp_path / "content"
    path.write_bytes(DATA)
    fd, _ = open_direct(path, os.O_RDONLY)
    try:
        got = read_into(fd, aligned_buffer(length + 2 * ALIGN), offset, length)
    finally:
        os.close(fd)
    assert bytes(got) == DATA[offset : offset + length]


def test_read_into_refuses_a_buffer_too_small_for_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "content"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="needs a 8192-byte buffer"):
            read_into(fd, aligned_buffer(ALIGN), 10, ALIGN)
    finally:
        os.close(fd)


def test_without_o_direct_everything_goes_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    path = fresh_file(tmp_path / "content")
    write_at(path, DATA, ALIGN)
    fd, direct = open_direct(path, os.O_RDONLY)
    try:
        assert not direct
        assert bytes(read_into(fd, aligned_buffer(len(DATA) + 2 * ALIGN), ALIGN, len(DATA))) == DATA
    finally:
        os.close(fd)


def test_open_direct_passes_other_errors_on(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_direct(tmp_path / "missing", os.O_RDONLY)
