"""`lazyfs mount --mode fuse`: real FUSE mounts of local and registry images, laziness, faults."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from lazyfs.convert.converter import convert_image, read_small_blob
from lazyfs.fuse.api import api_client
from lazyfs.fuse.control import Standby, spawn_daemon
from lazyfs.fuse.records import find_record
from lazyfs.rafs.loader import bootstrap_from_layer
from lazyfs.rafs.reader import Bootstrap
from tests.mounts import Lazyfs
from tests.registry_fixtures import RegistryServer, push_test_image
from tests.test_convert import image_layers, umoci_flatten, undated_implicit_dirs
from tests.test_rafs_fixtures import V6_BOOT
from tests.trees import make_rich_tree
from tests.walker import diff, snapshot


@pytest.fixture
def lazyfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lazyfs:
    cli = Lazyfs(tmp_path / "lazyfs")
    monkeypatch.setenv("LAZYFS_RUN_DIR", cli.env["LAZYFS_RUN_DIR"])  # for find_record in this process
    return cli


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source tree, bootstrap, blob dir) of a rich tree plus several multi-MiB random files."""
    root = tmp_path_factory.mktemp("built")
    src = make_rich_tree(root / "src", huge_sparse=False, many=300)
    for i in range(4):
        (src / f"random-{i}.bin").write_bytes(os.urandom(3 << 20))
    lazyfs = Lazyfs(root)
    lazyfs("build", str(src), "--bootstrap", str(root / "boot"), "--blob-dir", str(root / "blobs"))
    return src, root / "boot", root / "blobs"


def test_local_mount_is_identical_and_reports_status(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                                      tmp_path: Path) -> None:
    src, boot, blobs = built
    with lazyfs.mount(boot, tmp_path / "mnt", "--blob-dir", str(blobs)) as mnt:
        before = lazyfs.mount_status(mnt)
        assert before["mode"] == "fuse" and before["bytes_fetched"] == 0
        assert diff(snapshot(src), snapshot(mnt)) == []
        after = lazyfs.mount_status(mnt)
        assert after["bytes_read"] > 12 << 20 and after["bytes_fetched"] > 0
        record = find_record(mnt)
        assert record is not None
        with api_client(record.socket) as client:
            text = client.get("/metrics").text
        assert "lazyfs_fetch_backend_bytes_total" in text and "lazyfs_fetch_latency_seconds_bucket" in text
        st = os.stat(mnt / "a.txt")
        assert st.st_ino == os.stat(mnt / "hard.txt").st_ino and st.st_nlink == 2
        with pytest.raises(OSError) as info:
            (mnt / "new-file").write_text("x")
        assert info.value.errno == errno.EROFS
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize(("name", "amplify"), [("random-0.bin", 0), ("a.txt", 8 << 20)])
def test_small_read_fetches_only_the_chunk_it_needs(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                                    tmp_path: Path, name: str, amplify: int) -> None:
    """A 4 KiB read of a multi-chunk file fetches its first chunk only; with --amplify-io, a miss on a
    small file brings its neighbours (of other files) along, as nydusd does."""
    src, boot, blobs = built
    bootstrap = Bootstrap.open(boot)
    nid = bootstrap.lookup(bootstrap.inode(bootstrap.root_nid), name.encode())
    assert nid is not None
    first, *rest = bootstrap.chunks(bootstrap.inode(nid))
    assert bool(rest) == (name == "random-0.bin")
    with lazyfs.mount(boot, tmp_path / "mnt", "--blob-dir", str(blobs), "--amplify-io", str(amplify)) as mnt:
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == (src / name).read_bytes()[:4096]
        finally:
            os.close(fd)
        time.sleep(0.3)  # time for any readahead or merged neighbour to show up
        fetch = lazyfs.mount_status(mnt)["fetch"]
        assert fetch["backend_requests"] == 1
        if amplify:
            assert first.compressed_size < fetch["backend_bytes"] <= 1 << 20
        else:
            assert fetch["backend_bytes"] == first.compressed_size


def test_mounts_start_in_a_standby_daemon_or_without_one(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts need root")
    src, boot, blobs = built
    live, dead = Standby(), Standby()
    dead.proc.kill()
    dead.proc.wait()
    for standby, mnt in ((live, tmp_path / "m1"), (dead, tmp_path / "m2")):
        mnt.mkdir()
        spawn_daemon([str(boot), str(mnt), "--blob-dir", str(blobs), "--cache-dir", str(lazyfs.cache)], mnt,
                     standby=standby)
        try:
            assert (mnt / "a.txt").read_bytes() == (src / "a.txt").read_bytes()
            record = find_record(mnt)
            assert record is not None and record.alive()
            assert (record.pid == live.proc.pid) == (standby is live)  # the waiting process became the daemon
        finally:
            lazyfs("umount", str(mnt))


def test_second_mount_reuses_the_host_cache(lazyfs: Lazyfs, built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, boot, blobs = built
    with lazyfs.mount(boot, tmp_path / "m1", "--blob-dir", str(blobs)) as m1:
        assert (m1 / "random-1.bin").read_bytes() == (src / "random-1.bin").read_bytes()
        with lazyfs.mount(boot, tmp_path / "m2", "--blob-dir", str(blobs)) as m2:
            assert (m2 / "random-1.bin").read_bytes() == (src / "random-1.bin").read_bytes()
            assert lazyfs.mount_status(m2)["bytes_fetched"] == 0
    listing = lazyfs("cache", "ls", "--json", "--cache-dir", str(lazyfs.cache)).stdout
    assert json.loads(listing)[0]["ready_chunks"] > 0


def test_dead_backend_gives_eio_then_recovers(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                              tmp_path: Path) -> None:
    src, boot, blobs = built
    moved = tmp_path / "blobs-away"
    shutil.copytree(blobs, tmp_path / "blobs")
    with lazyfs.mount(boot, tmp_path / "mnt", "--blob-dir", str(tmp_path / "blobs"), "--read-timeout", "2") as mnt:
        (tmp_path / "blobs").rename(moved)
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            (mnt / "random-2.bin").read_bytes()
        assert info.value.errno == errno.EIO and time.monotonic() - start < 15
        moved.rename(tmp_path / "blobs")
        assert (mnt / "random-2.bin").read_bytes() == (src / "random-2.bin").read_bytes()


def test_prefetch_api_fetches_without_reads(lazyfs: Lazyfs, built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, boot, blobs = built
    with lazyfs.mount(boot, tmp_path / "mnt", "--blob-dir", str(blobs)) as mnt:
        record = find_record(mnt)
        assert record is not None
        with api_client(record.socket) as client:
            reply = client.post("/api/v1/prefetch", json={"paths": ["/random-3.bin"]})
            assert reply.status_code == 202 and reply.json()["chunks"] == 3
            assert client.post("/api/v1/prefetch", content=b"not json").status_code == 400
            assert client.get("/api/v1/nope").status_code == 404
        deadline = time.monotonic() + 10
        while lazyfs.mount_status(mnt)["bytes_fetched"] < 3 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        status = lazyfs.mount_status(mnt)
        assert status["bytes_fetched"] >= 3 << 20 and status["reads"]["reads"] == 0


def test_killed_daemon_is_cleaned_up_by_umount(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    _, boot, blobs = built
    mnt = tmp_path / "mnt"
    with lazyfs.mount(boot, mnt, "--blob-dir", str(blobs)):
        record = find_record(mnt)
        assert record is not None
        os.kill(record.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert [m["state"] for m in lazyfs.status()] == ["dead"]
        lazyfs("umount", str(mnt))
        assert not os.path.ismount(mnt)


def test_nydus_fixture_mounts(lazyfs: Lazyfs, tmp_path: Path) -> None:
    blobs = V6_BOOT.parents[1] / "blobs"
    lazyfs("unpack", str(V6_BOOT), "--blob-dir", str(blobs), str(tmp_path / "ref"))
    with lazyfs.mount(V6_BOOT, tmp_path / "mnt", "--blob-dir", str(blobs)) as mnt:
        assert diff(snapshot(tmp_path / "ref"), snapshot(mnt)) == []


def test_bad_source_fails_clearly(lazyfs: Lazyfs, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"\0" * 8192)
    proc = lazyfs("mount", str(bad), str(tmp_path / "mnt"), "--blob-dir", str(tmp_path), "--cache-dir",
                  str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "not a Nydus bootstrap" in proc.stderr
    assert not os.path.ismount(tmp_path / "mnt")


async def test_traced_files_are_prefetched_from_the_image_converted_with_them(
        registry: RegistryServer, lazyfs: Lazyfs, tmp_path: Path) -> None:
    async with registry.client() as client:
        pushed = await push_test_image(client, "trace/src", "1", image_layers())
        await convert_image(client, client, pushed.reference, f"{registry.host}/trace/nydus:1")
    with lazyfs.mount(f"{registry.host}/trace/nydus:1", tmp_path / "mnt", "--plain-http") as mnt:
        assert (mnt / "etc" / "passwd").read_text().startswith("root:x:0:0")
        assert (mnt / "bin" / "ls").read_bytes()[:4] == b"\x7fELF"  # a symlink: the file it names is traced
        (mnt / "etc" / "passwd").read_text()
        traced = lazyfs("trace", str(mnt)).stdout.splitlines()
    assert traced == ["/etc/passwd", "/bin/busybox"]
    (tmp_path / "list").write_text("\n".join(traced) + "\n")
    target = f"{registry.host}/trace/opt:1"
    lazyfs("convert", "--plain-http", "--prefetch-list", str(tmp_path / "list"), pushed.reference, target)
    async with registry.client() as client:
        layer = await read_small_blob(client, "trace/opt", (await client.get_manifest(target)).layers[-1],
                                      cap=64 << 20)
    boot = Bootstrap(bootstrap_from_layer(layer))
    root = boot.inode(boot.root_nid)
    expected = 0
    for path in traced:
        ino = root
        for part in path.encode().split(b"/")[1:]:
            nid = boot.lookup(ino, part)
            assert nid is not None
            ino = boot.inode(nid)
        expected += sum({c.index: c.compressed_size for c in boot.chunks(ino)}.values())
    with lazyfs.mount(target, tmp_path / "mnt2", "--plain-http", "--cache-dir", str(tmp_path / "cache2")) as mnt:
        deadline = time.monotonic() + 20
        while (status := lazyfs.mount_status(mnt))["prefetching"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status["reads"]["reads"] == 0  # nobody read: the mount fetched exactly the listed files
        assert status["fetch"]["prefetch_bytes"] == status["bytes_fetched"] == expected


@pytest.mark.parametrize("mode", ["fuse", "erofs"])
async def test_registry_image_mounts_lazily(registry: RegistryServer, lazyfs: Lazyfs, tmp_path: Path,
                                            mode: str) -> None:
    async with registry.client() as client:
        pushed = await push_test_image(client, "lazy/src", "1", image_layers())
        target = f"{registry.host}/lazy/nydus:1"
        result = await convert_image(client, client, pushed.reference, target)
    data_layers = {d.digest for d in result.layers[:-1]}

    def blob_bytes() -> int:
        return sum(e.size for e in registry.access_log()
                   if e.method == "GET" and any(d in e.path for d in data_layers) and "nydus" in e.path)

    reference = undated_implicit_dirs(snapshot(umoci_flatten(registry, pushed.reference, tmp_path / "umoci")))
    with lazyfs.mount(target, tmp_path / "mnt", "--plain-http", "--mode", mode) as mnt:
        assert blob_bytes() == 0  # metadata only: no data blob was touched
        assert (mnt / "etc" / "passwd").read_text().startswith("root:x:0:0")
        one_file = blob_bytes()
        assert 0 < one_file < sum(d.size for d in result.layers[:-1])
        assert diff(reference, undated_implicit_dirs(snapshot(mnt))) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{registry.host}/v2/lazy/nydus/manifests/nope", timeout=5).raise_for_status()
