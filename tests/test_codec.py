"""Chunk codecs: round trips, and safety under the fetcher's worker threads."""

from __future__ import annotations

import os
import threading

import pytest

from lazyfs.chunks.codec import Compressor, compress, decompress
from lazyfs.errors import FormatError


@pytest.mark.parametrize("algo", list(Compressor))
def test_round_trip(algo: Compressor) -> None:
    data = os.urandom(1000) + b"a" * 100_000
    if algo is Compressor.GZIP:
        with pytest.raises(FormatError):
            compress(algo, data)
        return
    assert decompress(algo, compress(algo, data), len(data)) == data


def test_wrong_size_and_garbage_are_format_errors() -> None:
    packed = compress(Compressor.ZSTD, b"x" * 5000)
    with pytest.raises(FormatError, match="expected 4999"):
        decompress(Compressor.ZSTD, packed, 4999)
    with pytest.raises(FormatError, match="corrupt lz4_block"):
        decompress(Compressor.LZ4_BLOCK, b"\xff" * 64, 5000)


def test_concurrent_threads_never_corrupt_data() -> None:
    chunks = [os.urandom(20_000) + bytes([i]) * 300_000 for i in range(8)]
    packed = [compress(Compressor.ZSTD, c) for c in chunks]
    failures: list[str] = []

    def work(k: int) -> None:
        for round_ in range(60):
            i = (k + round_) % len(chunks)
            if decompress(Compressor.ZSTD, packed[i], len(chunks[i])) != chunks[i]:
                failures.append(f"thread {k} chunk {i}")
            compress(Compressor.ZSTD, chunks[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
