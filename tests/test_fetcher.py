"""ChunkFetcher with real backends (local blob dir, docker-registry): correctness, single flight, merging,
corruption, dead backends, retries, prefetch bandwidth and priority."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from lazyfs.chunks.backends import Backend, DirBackend, RegistryBackend
from lazyfs.chunks.cache import CacheManager
from lazyfs.chunks.fetcher import (
    LATENCY_BUCKETS,
    ChunkFetcher,
    CorruptChunk,
    FetchError,
    FetchOptions,
    open_fetcher,
)
from lazyfs.errors import DigestMismatch
from lazyfs.rafs.builder import BuildOptions, build_layer
from lazyfs.rafs.export import export_blob_data, unique_chunks
from lazyfs.rafs.reader import Bootstrap
from lazyfs.rafs.tree import BlobInfo, ChunkRef, Tree
from tests import registry_fixtures
from tests.registry_fixtures import RegistryServer, run_registry

FAST = FetchOptions(read_timeout=5, request_timeout=2, retry_backoff=0.02, retry_max_delay=0.2, durable=False)


@dataclasses.dataclass
class Image:
    """A built layer: its source files, tree, blob and every chunk in compressed order."""

    files: dict[str, bytes]
    tree: Tree
    blob: BlobInfo
    blob_dir: Path
    chunks: list[ChunkRef]

    def file_chunks(self, name: str) -> list[ChunkRef]:
        node = self.tree.lookup(name.encode())
        assert node is not None
        return node.chunks


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """~60 small files (one chunk each) and three multi-chunk files, mixing compressible and random data."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    files = {f"small{i:02d}": rng.randbytes(rng.randrange(2000, 12000)) for i in range(60)}
    files.update({f"text{i}": (b"lazy chunks %d " % i) * rng.randrange(3000, 9000) for i in range(3)})
    for name, data in files.items():
        (src / name).write_bytes(data)
    result = build_layer(src, root / "blobs", BuildOptions(chunk_size=0x10000))
    assert result.blob is not None
    chunks = sorted(unique_chunks(result.tree)[0].values(), key=lambda c: c.compressed_offset)
    return Image(files, result.tree, result.blob, root / "blobs", chunks)


class CountingBackend:
    """Wraps a real backend, recording every range request; optionally delays or hangs the first ones."""

    def __init__(self, inner: Backend, delay: float = 0.0, hang_first: int = 0) -> None:
        self.inner = inner
        self.delay = delay
        self.hang_first = hang_first
        self.calls: list[tuple[int, int]] = []

    async def read_range(self, blob: BlobInfo, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        if len(self.calls) <= self.hang_first:
            await trio.sleep_forever()
        await trio.sleep(self.delay)
        return await self.inner.read_range(blob, offset, length)


@asynccontextmanager
async def fetcher_for(image: Image, backend: Backend, cache_dir: Path, options: FetchOptions = FAST
                      ) -> AsyncIterator[ChunkFetcher]:
    manager = CacheManager(cache_dir)
    try:
        async with open_fetcher(backend, manager, options, owner="test-mount") as fetcher:
            await fetcher.register_blob(image.blob, image.chunks)
            yield fetcher
    finally:
        manager.close()


async def until_idle(fetcher: ChunkFetcher) -> None:
    while fetcher.metrics.in_flight:
        await trio.sleep(0.01)


async def read_file(fetcher: ChunkFetcher, image: Image, name: str) -> bytes:
    return b"".join([await fetcher.get_chunk(image.blob, ref) for ref in image.file_chunks(name)])


async def test_dir_backend_serves_every_file_then_cache_hits(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir))
    amplified = dataclasses.replace(FAST, amplify=64 * 1024)
    async with fetcher_for(image, backend, tmp_path / "cache", amplified) as fetcher:
        for name, data in image.files.items():
            assert await read_file(fetcher, image, name) == data
        requests = len(backend.calls)
        assert requests < len(image.chunks)  # neighbours were merged
        for name, data in image.files.items():
            assert await read_file(fetcher, image, name) == data
        assert len(backend.calls) == requests
        m = fetcher.metrics
        assert 0 < m.memory_hits < m.cache_hits  # 32 MiB hold the whole small image, but merged-in
        # neighbours were never returned before, so their first read came from the disk cache
        assert m.chunks_fetched == len(image.chunks)
        assert m.backend_requests == requests <= m.cache_misses  # readers may join a batch still being cached
        assert m.cache_hits + m.cache_misses == 2 * sum(len(image.file_chunks(n)) for n in image.files)
        assert m.backend_bytes == sum(c.compressed_size for c in image.chunks)
        assert sum(m.latency_counts) == requests
        snapshot = json.loads(json.dumps(m.snapshot()))
        assert snapshot["latency_bounds"] == list(LATENCY_BUCKETS) and snapshot["cache_hits"] == m.cache_hits
    exported = export_blob_data(image.tree, image.blob_dir, tmp_path / "export")[0]
    assert (tmp_path / "cache" / f"{image.blob.blob_id}.blob.data").read_bytes() == exported.read_bytes()
    # Persistence: a new fetcher over the same cache needs no backend at all.
    async with fetcher_for(image, DirBackend(tmp_path / "nowhere"), tmp_path / "cache") as fetcher:
        assert await read_file(fetcher, image, "text1") == image.files["text1"]
        assert fetcher.metrics.backend_requests == 0
    manager = CacheManager(tmp_path / "cache")
    entry, = manager.ls()
    manager.close()
    assert (entry.ready_chunks, entry.owners) == (image.blob.chunk_count, ())


async def test_many_readers_of_one_chunk_cause_one_fetch(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir), delay=0.1)
    ref = image.file_chunks("text2")[1]
    results: list[bytes] = []
    async with fetcher_for(image, backend, tmp_path) as fetcher:

        async def reader() -> None:
            results.append(await fetcher.get_chunk(image.blob, ref))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(reader)
    assert len(backend.calls) == 1
    assert results == [image.files["text2"][0x10000:0x20000]] * 50


async def test_a_miss_fetches_only_the_chunks_asked_for(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir))
    async with fetcher_for(image, backend, tmp_path) as fetcher:
        ref = image.chunks[40]
        await fetcher.get_chunk(image.blob, ref)
        await until_idle(fetcher)
        assert backend.calls == [(ref.compressed_offset, ref.compressed_size)]
        text = image.file_chunks("text0")
        assert b"".join(await fetcher.get_chunks(image.blob, text)) == image.files["text0"]
        span = text[-1].compressed_offset + text[-1].compressed_size - text[0].compressed_offset
        assert backend.calls[1:] == [(text[0].compressed_offset, span)]  # one request for one file's chunks
        await fetcher.get_chunk(image.blob, image.chunks[41])  # the neighbour was not brought along
        assert len(backend.calls) == 3 and fetcher.metrics.cache_hits == 0


async def test_neighbouring_misses_are_merged_up_to_the_window(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir))
    window = 64 * 1024
    wanted = image.chunks[:30]
    async with fetcher_for(image, backend, tmp_path, dataclasses.replace(FAST, merge_window=window)) as fetcher:
        datas = await fetcher.get_chunks(image.blob, list(reversed(wanted)))
    assert all(len(d) == ref.uncompressed_size for d, ref in zip(datas, reversed(wanted), strict=True))
    span = wanted[-1].compressed_offset + wanted[-1].compressed_size - wanted[0].compressed_offset
    assert len(backend.calls) <= span // (window // 2) + 1 < len(wanted)
    assert all(length <= window for _, length in backend.calls)
    # With amplify, a single miss brings its following neighbours along: reading them costs nothing more.
    backend.calls.clear()
    amplified = dataclasses.replace(FAST, merge_window=window, amplify=window)
    async with fetcher_for(image, backend, tmp_path / "other", amplified) as f:
        await f.get_chunk(image.blob, image.chunks[40])
        await until_idle(f)
        await f.get_chunk(image.blob, image.chunks[41])
        assert len(backend.calls) == 1 and f.metrics.cache_hits == 1


NYDUS_TEXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nydus" / "dragonflyoss-nydus" / "tests" \
    / "texture"


@pytest.mark.skipif(not NYDUS_TEXTURE.is_dir(), reason="../shared/fixtures not present")
async def test_real_nydus_image_blob_fills_a_cache_identical_to_export(tmp_path: Path) -> None:
    tree = Bootstrap.open(NYDUS_TEXTURE / "bootstrap" / "rafs-v6-2.2.boot").to_tree()
    blob, chunks = tree.blobs[0], list(unique_chunks(tree)[0].values())
    manager = CacheManager(tmp_path / "cache")
    async with open_fetcher(DirBackend(NYDUS_TEXTURE / "blobs"), manager, FAST) as fetcher:
        await fetcher.register_blob(blob, chunks)
        await fetcher.get_chunks(blob, chunks)
    manager.close()
    exported = export_blob_data(tree, NYDUS_TEXTURE / "blobs", tmp_path / "export")[0]
    assert (tmp_path / "cache" / exported.name).read_bytes() == exported.read_bytes()


@pytest.fixture
async def pushed(image: Image, registry: RegistryServer) -> AsyncIterator[RegistryServer]:
    async with registry.client() as client:
        blob_file = image.blob_dir / image.blob.blob_id
        await client.push_blob("lazy/image", blob_file, f"sha256:{image.blob.blob_id}")
    yield registry


async def test_registry_backend_serves_every_chunk_with_merged_ranges(
    image: Image, pushed: RegistryServer, tmp_path: Path
) -> None:
    async with pushed.client() as client:
        backend = RegistryBackend(client, "lazy/image")
        async with fetcher_for(image, backend, tmp_path) as fetcher:
            got = await fetcher.get_chunks(image.blob, image.chunks)
            assert b"".join(got[i] for i in range(len(got))) == b"".join(
                [await fetcher.get_chunk(image.blob, c) for c in image.chunks])
            for name, data in image.files.items():
                assert await read_file(fetcher, image, name) == data
            requests = fetcher.metrics.backend_requests
    blob_gets = [e for e in pushed.access_log() if e.method == "GET" and image.blob.blob_id in e.path]
    assert len(blob_gets) == requests < len(image.chunks) // 4
    assert sum(e.size for e in blob_gets) == sum(c.compressed_size for c in image.chunks)


def _corrupt_copy(image: Image, dest: Path, victim: ChunkRef) -> Path:
    dest.mkdir()
    path = dest / image.blob.blob_id
    shutil.copy(image.blob_dir / image.blob.blob_id, path)
    with path.open("r+b") as f:
        f.seek(victim.compressed_offset + victim.compressed_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))
    return dest


async def test_corrupt_blob_byte_fails_that_chunk_only_and_caches_nothing(
    image: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = image.file_chunks("small10")[0]
    bad_dir = _corrupt_copy(image, tmp_path / "bad", victim)
    async with fetcher_for(image, DirBackend(bad_dir), tmp_path / "cache") as fetcher:
        with caplog.at_level(logging.ERROR, logger="lazyfs.chunks.fetcher"), pytest.raises(CorruptChunk) as info:
            await fetcher.get_chunk(image.blob, victim)
        assert isinstance(info.value, FetchError) and isinstance(info.value, DigestMismatch)
        assert f"corrupt chunk blob={image.blob.blob_id} chunk={victim.index}" in caplog.text
        assert not fetcher._blobs[image.blob.blob_id].cache.is_ready(victim.index)
        assert await read_file(fetcher, image, "small09") == image.files["small09"]
        assert await read_file(fetcher, image, "small11") == image.files["small11"]
        with pytest.raises(CorruptChunk):  # still refetched (and refused) on every read
            await read_file(fetcher, image, "small10")
        assert fetcher.metrics.corrupt_chunks == 2


async def test_corrupt_cached_data_is_refetched(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir))
    ref = image.file_chunks("text0")[0]
    options = dataclasses.replace(FAST, memory_cache=0)  # every read goes to the disk cache
    async with fetcher_for(image, backend, tmp_path, options) as fetcher:
        await fetcher.get_chunk(image.blob, ref)
        await until_idle(fetcher)  # readers get data before it is written to the cache
        with (tmp_path / f"{image.blob.blob_id}.blob.data").open("r+b") as f:
            f.seek(ref.uncompressed_offset + 7)
            f.write(b"?")
        calls = len(backend.calls)
        assert await fetcher.get_chunk(image.blob, ref) == image.files["text0"][:0x10000]
        assert len(backend.calls) == calls + 1


async def test_missing_blob_dir_fails_within_timeout_then_recovers(image: Image, tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    options = dataclasses.replace(FAST, read_timeout=1.5)
    ref = image.file_chunks("small03")[0]
    async with fetcher_for(image, DirBackend(blob_dir), tmp_path / "cache", options) as fetcher:
        start = trio.current_time()
        with pytest.raises(FetchError, match=r"after 1.5 s: .*No such file or directory"):
            await fetcher.get_chunk(image.blob, ref)
        assert 1.5 <= trio.current_time() - start < 2.5
        assert fetcher.metrics.backend_errors >= 2 and fetcher.metrics.failed_reads == 1
        shutil.copytree(image.blob_dir, blob_dir)
        assert await fetcher.get_chunk(image.blob, ref) == image.files["small03"]


@pytest.fixture
def registry_port_pinned(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make run_registry reuse one port, so a restarted registry is the same endpoint."""
    port = registry_fixtures.free_port()
    monkeypatch.setattr(registry_fixtures, "free_port", lambda: port)
    yield


@pytest.mark.usefixtures("registry_port_pinned")
async def test_registry_down_gives_fetch_error_in_time_and_recovers(image: Image, tmp_path: Path) -> None:
    options = dataclasses.replace(FAST, read_timeout=2)
    workdir = tmp_path / "registry"
    with run_registry(workdir) as server:
        async with server.client() as client:
            await client.push_blob("lazy/image", image.blob_dir / image.blob.blob_id)
    async with (
        server.client() as client,
        fetcher_for(image, RegistryBackend(client, "lazy/image"), tmp_path / "cache", options) as fetcher,
    ):
        start = trio.current_time()
        with pytest.raises(FetchError):
            await fetcher.get_chunk(image.blob, image.file_chunks("small20")[0])
        assert trio.current_time() - start < 3
        with run_registry(workdir):
            assert await read_file(fetcher, image, "small20") == image.files["small20"]


async def test_hung_request_is_timed_out_and_retried(image: Image, tmp_path: Path) -> None:
    backend = CountingBackend(DirBackend(image.blob_dir), hang_first=1)
    options = dataclasses.replace(FAST, request_timeout=0.3)
    async with fetcher_for(image, backend, tmp_path, options) as fetcher:
        assert await read_file(fetcher, image, "small05") == image.files["small05"]
        assert len(backend.calls) == 2 and fetcher.metrics.backend_errors == 1


async def test_prefetch_respects_bandwidth_limit(image: Image, tmp_path: Path) -> None:
    total = sum(c.compressed_size for c in image.chunks)
    limit = int(total / 1.2)
    async with fetcher_for(image, DirBackend(image.blob_dir), tmp_path) as fetcher:
        start = trio.current_time()
        await fetcher.prefetch(image.blob, image.chunks, bandwidth_limit=limit)
        elapsed = trio.current_time() - start
        assert fetcher.metrics.prefetch_bytes == fetcher.metrics.backend_bytes == total
        assert elapsed >= total / limit
        assert elapsed < total / limit + 1.5
        for name, data in image.files.items():
            assert await read_file(fetcher, image, name) == data
        assert fetcher.metrics.cache_misses == 0


async def test_on_demand_reads_overtake_a_throttled_prefetch(image: Image, tmp_path: Path) -> None:
    total = sum(c.compressed_size for c in image.chunks)
    async with fetcher_for(image, DirBackend(image.blob_dir), tmp_path) as fetcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.prefetch, image.blob, image.chunks, total // 10)
            await trio.sleep(0.3)
            start = trio.current_time()
            assert await read_file(fetcher, image, "text2") == image.files["text2"]
            assert trio.current_time() - start < 0.5
            nursery.cancel_scope.cancel()
        # Flights the cancelled prefetch abandoned are fetched again by readers.
        for name, data in image.files.items():
            assert await read_file(fetcher, image, name) == data
