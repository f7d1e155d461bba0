"""Build -> read -> unpack and build -> kernel EROFS mount give back the source tree exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.rafs.builder import BuildOptions, build_layer
from lazyfs.rafs.export import export_blob_data, unpack_tree
from lazyfs.rafs.reader import Bootstrap
from tests.kernel import erofs_mount
from tests.trees import make_rich_tree
from tests.walker import diff, snapshot


def _build(src: Path, work: Path, options: BuildOptions | None = None) -> tuple[Path, Path]:
    result = build_layer(src, work / "blobs", options or BuildOptions())
    boot = work / "bootstrap"
    boot.write_bytes(result.bootstrap)
    return boot, work / "blobs"


@pytest.fixture(scope="module")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every entry kind, a 5 GiB sparse file and a directory of 10 001 entries."""
    return make_rich_tree(tmp_path_factory.mktemp("rich") / "src")


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kinds of entries at a size that many codec settings can afford."""
    return make_rich_tree(tmp_path_factory.mktemp("small") / "src", huge_sparse=False, many=300)


def test_unpack_round_trip_default_settings(rich_tree: Path, tmp_path: Path) -> None:
    boot, blobs = _build(rich_tree, tmp_path)
    unpack_tree(Bootstrap.open(boot).to_tree(), blobs, tmp_path / "out")
    assert diff(snapshot(rich_tree), snapshot(tmp_path / "out")) == []


@pytest.mark.parametrize(
    ("compressor", "digester", "chunk_size"),
    [
        (Compressor.ZSTD, Digester.SHA256, 0x400000),
        (Compressor.LZ4_BLOCK, Digester.SHA256, 0x10000),
        (Compressor.NONE, Digester.BLAKE3, 0x1000),
    ],
)
def test_unpack_round_trip_codecs(small_tree: Path, tmp_path: Path, compressor: Compressor, digester: Digester,
                                  chunk_size: int) -> None:
    boot, blobs = _build(small_tree, tmp_path, BuildOptions(compressor, digester, chunk_size))
    tree = Bootstrap.open(boot).to_tree()
    assert tree.blobs[0].compressor is compressor and tree.blobs[0].digester is digester
    assert tree.chunk_size == chunk_size
    unpack_tree(tree, blobs, tmp_path / "out")
    assert diff(snapshot(small_tree), snapshot(tmp_path / "out")) == []


def test_dedup_and_sparse_chunks(rich_tree: Path, tmp_path: Path) -> None:
    boot, _ = _build(rich_tree, tmp_path)
    tree = Bootstrap.open(boot).to_tree()
    root = tree.root.children()
    assert root[b"dup1"].chunks == root[b"dup2"].chunks
    assert root[b"hard.txt"] is root[b"a.txt"]
    sparse = root[b"sparse"]
    assert sparse.size == (5 << 30) and len(sparse.chunks) == 5 * 1024
    assert len({c.index for c in sparse.chunks}) == 2  # one deduplicated zero chunk plus the tail


def test_kernel_erofs_mount_matches_source(rich_tree: Path, tmp_path: Path) -> None:
    boot, blobs = _build(rich_tree, tmp_path)
    devices = export_blob_data(Bootstrap.open(boot).to_tree(), blobs, tmp_path / "export")
    with erofs_mount(boot, devices, tmp_path / "mnt") as mnt:
        assert diff(snapshot(rich_tree), snapshot(mnt)) == []


def test_fsck_erofs_accepts_our_bootstrap(tmp_path: Path) -> None:
    fsck = shutil.which("fsck.erofs")
    if fsck is None:
        pytest.skip("erofs-utils not installed")
    src = make_rich_tree(tmp_path / "src", huge_sparse=False, many=50)
    os.unlink(os.fsencode(src) + b"/" + b"n" * 255)  # erofs-utils 1.5 fails on 255-byte names (its bug)
    boot, blobs = _build(src, tmp_path)
    devices = export_blob_data(Bootstrap.open(boot).to_tree(), blobs, tmp_path / "export")
    out = tmp_path / "extracted"
    proc = subprocess.run([fsck, f"--device={devices[0]}", f"--extract={out}", str(boot)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "sub" / "deep" / "f").read_bytes() == b"deep"
    assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_prefetch_table_holds_listed_paths(rich_tree: Path, tmp_path: Path) -> None:
    boot, _ = _build(rich_tree, tmp_path, BuildOptions(prefetch=(b"/a.txt", b"/sub/deep")))
    b = Bootstrap.open(boot)
    assert b.to_tree().prefetch == [b"/a.txt", b"/sub/deep"]
    assert all(b.inode(n) for n in b.prefetch_nids())


_names = st.binary(min_size=1, max_size=40).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_trees = st.recursive(
    st.one_of(st.binary(max_size=9000), st.tuples(st.just("link"), st.binary(min_size=1, max_size=60))),
    lambda children: st.dictionaries(_names, children, max_size=6),
    max_leaves=25,
)


def _materialise(path: bytes, spec: object) -> None:
    if isinstance(spec, dict):
        os.mkdir(path)
        for name, child in spec.items():
            _materialise(path + b"/" + name, child)
    elif isinstance(spec, tuple):
        os.symlink(spec[1].replace(b"\0", b"_"), path)
    else:
        assert isinstance(spec, bytes)
        with open(path, "wb") as f:
            f.write(spec)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(_names, _trees, max_size=8), chunk_shift=st.integers(12, 14))
def test_random_trees_round_trip(tmp_path: Path, spec: dict[bytes, object], chunk_shift: int) -> None:
    work = tmp_path / os.urandom(6).hex()
    src = os.fsencode(work / "src")
    os.makedirs(work)
    _materialise(src, spec)
    boot, blobs = _build(Path(os.fsdecode(src)), work, BuildOptions(chunk_size=1 << chunk_shift))
    unpack_tree(Bootstrap.open(boot).to_tree(), blobs, work / "out")
    assert diff(snapshot(src), snapshot(work / "out")) == []


def test_lookup_agrees_with_readdir_in_big_directory(small_tree: Path, tmp_path: Path) -> None:
    boot_path, _ = _build(small_tree, tmp_path)
    boot = Bootstrap.open(boot_path)
    many = boot.inode(boot.lookup(boot.inode(boot.root_nid), b"many") or -1)
    entries = list(boot.readdir(many))
    assert len(entries) == 302 and many.size > 4096  # several dirent blocks
    for name, nid, _ in entries:
        assert boot.lookup(many, name) == nid
    for missing in (b"", b"-", b"entry-", b"entry-000299x", b"zzz"):
        assert boot.lookup(many, missing) is None


@pytest.fixture(scope="module")
def debian_rootfs() -> Path:
    """A debootstrap'd Debian root (made by `make rootfs`; its path in LAZYFS_TEST_ROOTFS)."""
    path = Path(os.environ.get("LAZYFS_TEST_ROOTFS", "/var/cache/lazyfs/rootfs-bookworm"))
    if not (path / "usr" / "bin" / "python3").exists():
        pytest.skip(f"no Debian rootfs at {path}: run `make rootfs`")
    return path


def test_debian_rootfs_round_trip_and_kernel_mount(debian_rootfs: Path, tmp_path: Path) -> None:
    boot, blobs = _build(debian_rootfs, tmp_path)
    tree = Bootstrap.open(boot).to_tree()
    unpack_tree(tree, blobs, tmp_path / "out")
    source = snapshot(debian_rootfs)
    assert len(source) > 5000
    assert diff(source, snapshot(tmp_path / "out")) == []
    devices = export_blob_data(tree, blobs, tmp_path / "export")
    with erofs_mount(boot, devices, tmp_path / "mnt") as mnt:
        assert diff(source, snapshot(mnt)) == []
