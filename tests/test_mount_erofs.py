"""`lazyfs mount --mode erofs`: kernel EROFS mounts over lazily fetched blob devices (real mounts, root)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import pyfuse3
import pytest

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.chunks.fetcher import FetchError
from lazyfs.fuse.blobdev import FIRST_BLOB_INODE, BlobDevice, BlobDevicesFilesystem
from lazyfs.rafs.tree import BlobInfo, ChunkRef
from tests.kernel import require_erofs
from tests.mounts import Lazyfs, leftovers, loops_under, mount_table
from tests.test_rafs_fixtures import V6_BOOT
from tests.trees import make_rich_tree
from tests.walker import diff, snapshot

RANDOM_FILE = 3 << 20


def erofs_mount(lazyfs: Lazyfs, source: Path, *extra: str, mode: str = "erofs") -> AbstractContextManager[Path]:
    """A mount at ``root/mnt`` in *mode* (erofs by default)."""
    return lazyfs.mount(source, lazyfs.root / "mnt", "--mode", mode, *extra)


def read_timed(path: Path) -> float:
    start = time.monotonic()
    snapshot(str(path))
    return time.monotonic() - start


def require_mounts() -> None:
    """Skip unless this machine can mount FUSE and EROFS (root, /dev/fuse, erofs, losetup)."""
    require_erofs()
    if not Path("/dev/fuse").exists():
        pytest.skip("FUSE mounts need /dev/fuse")


@pytest.fixture
def lazyfs(tmp_path: Path) -> Lazyfs:
    require_mounts()
    return Lazyfs(tmp_path / "lazyfs")


class FakeSource:
    """Chunk data made of the chunk's index byte; fails when told to."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []
        self.down = False

    async def get_chunks(self, blob: BlobInfo, refs: Sequence[ChunkRef]) -> list[bytes]:
        self.asked.append([ref.index for ref in refs])
        if self.down:
            raise FetchError("backend down")
        return [bytes([ref.index + 1]) * ref.uncompressed_size for ref in refs]

    async def read_ranges(self, blob: BlobInfo, spans: Sequence[tuple[ChunkRef, int, int]]) -> list[bytes]:
        data = await self.get_chunks(blob, [ref for ref, _, _ in spans])
        return [chunk[start:stop] for chunk, (_, start, stop) in zip(data, spans, strict=True)]


async def test_device_reads_map_to_overlapping_chunks_with_zeros_between() -> None:
    blob = BlobInfo("b" * 64, 3, 8192, Compressor.NONE, Digester.SHA256, 0, 20000, 20481, Compressor.NONE, 0, 0, 0)
    layout = [(2, 16384, 4097), (0, 0, 4096), (1, 8192, 5000)]  # (index, uncompressed offset, size), any order
    refs = [ChunkRef(0, i, b"", i * 8192, size, off, size) for i, off, size in layout]
    source = FakeSource()
    fs = BlobDevicesFilesystem([BlobDevice.build(blob, refs)], source)
    fh = pyfuse3.FileHandleT(FIRST_BLOB_INODE)
    expected = b"\1" * 4096 + bytes(4096) + b"\2" * 5000 + bytes(3192) + b"\3" * 4097 + bytes(4095)
    attrs = await fs.getattr(pyfuse3.InodeT(FIRST_BLOB_INODE), None)  # type: ignore[arg-type]
    assert attrs.st_size == len(expected) == 24576  # rounded up to whole blocks
    for off, size in [(0, 24576), (4000, 13000), (4096, 4096), (13000, 200), (20480, 8192), (30000, 10)]:
        assert await fs.read(fh, off, size) == expected[off : off + size]
    assert source.asked == [[0, 1, 2], [0, 1, 2], [1], [2]]  # ranges of zeros ask for nothing
    source.down = True
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.read(fh, 0, 10)
    assert info.value.errno == errno.EIO and fs.stats.read_errors == 1


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source, bootstrap, blob dir): a rich tree plus four 3 MiB random files, in 1 MiB chunks."""
    require_mounts()
    root = tmp_path_factory.mktemp("erofs-built")
    src = make_rich_tree(root / "src", huge_sparse=False, many=300)
    for i in range(4):
        (src / f"random-{i}.bin").write_bytes(os.urandom(RANDOM_FILE))
    Lazyfs(root)("build", str(src), "--bootstrap", str(root / "boot"), "--blob-dir", str(root / "blobs"),
                 "--chunk-size", "0x100000")
    return src, root / "boot", root / "blobs"


def test_rich_tree_is_identical_and_unmount_leaves_nothing(lazyfs: Lazyfs, built: tuple[Path, Path, Path]) -> None:
    src, boot, blobs = built
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs)) as mnt:
        assert sorted(mount_table(lazyfs.root).values()) == ["erofs", "fuse.lazyfs"]  # image, blob devices
        assert len(loops_under(lazyfs.root)) == 2  # the bootstrap's and the blob's
        assert diff(snapshot(str(src)), snapshot(str(mnt))) == []
        status = lazyfs.mount_status(mnt)
        assert status["mode"] == "erofs" and status["bytes_fetched"] > 0 and status["bytes_read"] > 0
        with pytest.raises(OSError) as info:
            (mnt / "new-file").write_text("x")
        assert info.value.errno == errno.EROFS
        lazyfs("umount", str(mnt))
        assert leftovers(lazyfs.root) == [] and not os.path.ismount(mnt)


@pytest.mark.skipif(not V6_BOOT.exists(), reason="../shared/fixtures not present")
def test_nydus_fixture_mounts(lazyfs: Lazyfs, tmp_path: Path) -> None:
    blobs = V6_BOOT.parents[1] / "blobs"
    lazyfs("unpack", str(V6_BOOT), "--blob-dir", str(blobs), str(tmp_path / "ref"))
    with erofs_mount(lazyfs, V6_BOOT, "--blob-dir", str(blobs)) as mnt:
        assert diff(snapshot(str(tmp_path / "ref")), snapshot(str(mnt))) == []


def test_metadata_is_free_and_one_file_fetches_its_chunks(lazyfs: Lazyfs, built: tuple[Path, Path, Path]) -> None:
    src, boot, blobs = built
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs)) as mnt:
        for dirpath, _, names in os.walk(mnt):  # stat, list and readlink everything: the kernel's business
            for name in names:
                os.lstat(os.path.join(dirpath, name))
        assert lazyfs.mount_status(mnt)["bytes_fetched"] == 0
        assert (mnt / "random-1.bin").read_bytes() == (src / "random-1.bin").read_bytes()
        fetched = lazyfs.mount_status(mnt)["bytes_fetched"]
        assert RANDOM_FILE <= fetched <= RANDOM_FILE + (1 << 20)  # its 3 chunks, plus at most a merge window


def test_dead_backend_gives_eio_then_recovers(lazyfs: Lazyfs, built: tuple[Path, Path, Path],
                                              tmp_path: Path) -> None:
    src, boot, built_blobs = built
    blobs, moved = tmp_path / "blobs", tmp_path / "blobs-away"
    shutil.copytree(built_blobs, blobs)
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs), "--read-timeout", "2") as mnt:
        blobs.rename(moved)
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            (mnt / "random-2.bin").read_bytes()
        assert info.value.errno == errno.EIO and time.monotonic() - start < 15
        moved.rename(blobs)
        assert (mnt / "random-2.bin").read_bytes() == (src / "random-2.bin").read_bytes()
        assert lazyfs.mount_status(mnt)["reads"]["read_errors"] > 0


def test_external_unmount_stops_the_daemon(lazyfs: Lazyfs, built: tuple[Path, Path, Path]) -> None:
    _, boot, blobs = built
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs)) as mnt:
        assert (mnt / "a.txt").read_bytes() == b"hello\n"
        subprocess.run(["umount", str(mnt)], check=True)
        assert leftovers(lazyfs.root) == []  # the daemon noticed: devices unmounted, loops gone
        assert json.loads(lazyfs("status", "--json").stdout) == []  # and it removed its record


def test_read_time_erofs_vs_fuse(built: tuple[Path, Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Reading the whole tree cold (fresh cache) and warm in both modes; the figures are printed."""
    require_mounts()
    src, boot, blobs = built
    times = {}
    for mode in ("erofs", "fuse"):
        with erofs_mount(Lazyfs(tmp_path / mode), boot, "--blob-dir", str(blobs), mode=mode) as mnt:
            times[mode] = (read_timed(mnt), read_timed(mnt))
            assert diff(snapshot(str(src)), snapshot(str(mnt))) == []
    with capsys.disabled():
        print("\nwhole rich tree (walker, sha256 of every file): "
              + "; ".join(f"{mode} cold {cold:.2f} s, warm {warm:.2f} s" for mode, (cold, warm) in times.items()))


def test_complete_cache_is_the_device_itself(lazyfs: Lazyfs, built: tuple[Path, Path, Path]) -> None:
    src, boot, blobs = built
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs), "--prefetch-all", mode="fuse") as mnt:
        deadline = time.monotonic() + 30
        while lazyfs.mount_status(mnt)["prefetching"] and time.monotonic() < deadline:
            time.sleep(0.1)
    with erofs_mount(lazyfs, boot, "--blob-dir", str(blobs)) as mnt:
        cache = os.path.realpath(lazyfs.cache) + "/"
        backing = [p.read_text().strip() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
        assert any(b.startswith(cache) and b.endswith(".blob.data") for b in backing)
        assert diff(snapshot(src), snapshot(mnt)) == []
        assert lazyfs.mount_status(mnt)["bytes_fetched"] == 0
