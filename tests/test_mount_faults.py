"""FUSE mounts of a ~200 MB image in a real docker-registry: laziness, persistence, concurrency, faults."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from lazyfs.chunks.cache import BlobCache
from lazyfs.chunks.digest import digest
from lazyfs.convert.converter import convert_image
from lazyfs.fuse.records import find_record
from lazyfs.rafs.loader import bootstrap_from_layer
from lazyfs.rafs.reader import Bootstrap
from lazyfs.rafs.tree import Tree
from tests.mounts import Lazyfs
from tests.registry_fixtures import RegistryServer, push_test_image, run_registry

BIG_FILES = 24  # 8 MiB each: ~200 MB of incompressible data
SMALL_FILES = 40  # 10 KB each


@dataclass
class Image:
    """A converted Nydus image in a registry, and what it holds."""

    registry: RegistryServer
    workdir: Path
    ref: str
    files: dict[str, bytes]
    bootstrap: bytes
    tree: Tree

    def blob_bytes(self) -> int:
        """Blob bytes the registry served for the Nydus image's data layers (its own access log)."""
        ids = {b.blob_id for b in self.tree.blobs}
        return sum(e.size for e in self.registry.access_log()
                   if e.method == "GET" and "/blobs/" in e.path and e.path.rsplit(":", 1)[-1] in ids)


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    work = tmp_path_factory.mktemp("faults")
    files = {f"big/file-{i:02d}.bin": os.urandom(8 << 20) for i in range(BIG_FILES)}
    files |= {f"small/note-{i:02d}.txt": os.urandom(10_000) for i in range(SMALL_FILES)}
    with run_registry(work / "registry") as registry:

        async def prepare() -> bytes:
            async with registry.client() as client:
                pushed = await push_test_image(client, "faults/src", "1", [_layer(files)], compression="none")
                await convert_image(client, client, pushed.reference, f"{registry.host}/faults/nydus:1")
                manifest = await client.get_manifest(f"{registry.host}/faults/nydus:1")
                async with client.get_blob_stream("faults/nydus", manifest.layers[-1].digest) as stream:
                    layer = b"".join([piece async for piece in stream])
            return bootstrap_from_layer(layer)

        boot = trio.run(prepare)
        yield Image(registry, work, f"{registry.host}/faults/nydus:1", files, boot, Bootstrap(boot).to_tree())


@pytest.fixture
def lazyfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lazyfs:
    cli = Lazyfs(tmp_path / "lazyfs")
    monkeypatch.setenv("LAZYFS_RUN_DIR", cli.env["LAZYFS_RUN_DIR"])
    return cli


def test_reading_one_small_file_fetches_only_its_chunks(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    before = image.blob_bytes()
    with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http") as mnt:
        assert image.blob_bytes() == before
        assert (mnt / "small" / "note-07.txt").read_bytes() == image.files["small/note-07.txt"]
        status = lazyfs.mount_status(mnt)
        window = 1 << 20
        assert 10_000 <= status["bytes_fetched"] <= window
        assert image.blob_bytes() - before <= window
        assert sum(len(d) for d in image.files.values()) > 190 << 20


def test_remount_reads_from_the_cache(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    names = ["big/file-03.bin", "small/note-01.txt", "small/note-30.txt"]
    with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http") as mnt:
        for name in names:
            assert (mnt / name).read_bytes() == image.files[name]
    before = image.blob_bytes()
    with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http") as mnt:
        for name in names:
            assert (mnt / name).read_bytes() == image.files[name]
        assert lazyfs.mount_status(mnt)["bytes_fetched"] == 0
    assert image.blob_bytes() == before


def test_sixteen_parallel_readers_fetch_each_chunk_once(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    names = [f"big/file-{i:02d}.bin" for i in range(8)]
    errors: list[BaseException] = []
    with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http") as mnt:

        def reader(k: int) -> None:
            try:
                for name in names[k % 8 :] + names[: k % 8]:  # overlapping, in different orders
                    with open(mnt / name, "rb") as f:
                        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(image.files[name]).digest()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        fetch = lazyfs.mount_status(mnt)["fetch"]
    wanted = {c.index for name in names for c in image.tree.lookup(b"/" + name.encode()).chunks}  # type: ignore[union-attr]
    assert fetch["chunks_fetched"] <= len(wanted) + 8  # merged neighbours at most, never a chunk twice
    stored = {c.index: c.compressed_size for _, n in image.tree.walk() for c in n.chunks}
    assert fetch["backend_bytes"] <= sum(stored.values())


def test_kill_mid_fetch_leaves_no_bad_chunk(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with lazyfs.mount(image.ref, mnt, "--plain-http", "--prefetch-all"):
        record = find_record(mnt)
        assert record is not None
        deadline = time.monotonic() + 20
        while lazyfs.mount_status(mnt)["bytes_fetched"] < 20 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(record.pid, signal.SIGKILL)
    blob = image.tree.blobs[0]
    cache = BlobCache.open(lazyfs.cache, blob)
    chunks = {c.index: c for _, n in image.tree.walk() for c in n.chunks}
    try:
        ready = [i for i in chunks if cache.is_ready(i)]
        assert ready, "the prefetch stored nothing before the kill"
        for i in ready:
            assert digest(blob.digester, cache.read(chunks[i], verify_digest=False)) == chunks[i].digest
    finally:
        cache.close()
    with lazyfs.mount(image.ref, mnt, "--plain-http") as again:
        assert (again / "big" / "file-20.bin").read_bytes() == image.files["big/file-20.bin"]


def test_registry_outage_gives_eio_then_recovers(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http", "--read-timeout", "3") as mnt:
        assert (mnt / "small" / "note-02.txt").read_bytes() == image.files["small/note-02.txt"]
        image.registry.stop()
        try:
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                (mnt / "big" / "file-11.bin").read_bytes()
            assert info.value.errno == errno.EIO and time.monotonic() - start < 20
        finally:
            image.registry.restart()
        assert (mnt / "big" / "file-11.bin").read_bytes() == image.files["big/file-11.bin"]


def test_corrupt_byte_fails_only_that_file(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    blob = image.tree.blobs[0]
    victim = image.tree.lookup(b"/big/file-15.bin")
    assert victim is not None
    chunk = victim.chunks[2]
    data_file = image.registry.blob_path(f"sha256:{blob.blob_id}")
    original = data_file.read_bytes()
    corrupt = bytearray(original)
    corrupt[chunk.compressed_offset + 100] ^= 0x40
    data_file.write_bytes(bytes(corrupt))
    try:
        with lazyfs.mount(image.ref, tmp_path / "mnt", "--plain-http", "--read-timeout", "5") as mnt:
            with pytest.raises(OSError) as info:
                (mnt / "big" / "file-15.bin").read_bytes()
            assert info.value.errno == errno.EIO
            assert (mnt / "big" / "file-16.bin").read_bytes() == image.files["big/file-16.bin"]
            record = find_record(mnt)
            assert record is not None
            log = (record.folder / "daemon.log").read_text()
            assert f"chunk={chunk.index}" in log and blob.blob_id[:12] in log
    finally:
        data_file.write_bytes(original)


def test_local_bootstrap_with_blobs_from_the_registry(image: Image, lazyfs: Lazyfs, tmp_path: Path) -> None:
    boot = tmp_path / "image.boot"
    boot.write_bytes(image.bootstrap)
    with lazyfs.mount(boot, tmp_path / "mnt", "--image", image.ref, "--plain-http") as mnt:
        assert (mnt / "small" / "note-05.txt").read_bytes() == image.files["small/note-05.txt"]
        assert lazyfs.mount_status(mnt)["bytes_fetched"] > 0
