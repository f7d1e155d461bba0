"""Real nydus-image output: every RAFS v6 fixture parses and its chunks match their digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lazyfs.rafs import blobmeta
from lazyfs.rafs.blob import extract_bootstrap, read_chunk, read_toc, read_toc_entry
from lazyfs.rafs.export import export_blob_data, unique_chunks, unpack_tree
from lazyfs.rafs.loader import load_tree, read_bootstrap_bytes
from lazyfs.rafs.reader import Bootstrap
from tests.kernel import erofs_mount
from tests.walker import diff, snapshot

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nydus"
NY = FIXTURES / "dragonflyoss-nydus" / "tests" / "texture"
V6_BOOT = NY / "bootstrap" / "rafs-v6-2.2.boot"
V6_BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
TOC_BLOB = NY / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
SNAPSHOTTER_V6 = (FIXTURES / "containerd-nydus-snapshotter" / "pkg" / "filesystem" / "testdata"
                  / "v6-bootstrap-chunk-pos-438272.tar.gz")

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")


def test_v22_bootstrap_superblock_and_tree() -> None:
    boot = Bootstrap.open(V6_BOOT)
    assert boot.sb.root_nid == 128 and boot.sb.meta_blkaddr == 2
    assert [b.blob_id for b in boot.blobs] == [V6_BLOB_ID]
    tree = boot.to_tree()
    assert sorted(tree.root.children()) == [b"lib.rs", b"sync_io.rs"]
    assert tree.root.children()[b"lib.rs"].size == 16931


def test_v22_chunks_match_digests_and_blob_meta() -> None:
    tree = load_tree(V6_BOOT)
    blob = tree.blobs[0]
    path = NY / "blobs" / V6_BLOB_ID
    with open(path, "rb") as f:
        for _, node in tree.walk():
            for ref in node.chunks:
                assert len(read_chunk(f, blob, ref)) == ref.uncompressed_size
        # the chunk table and the blob's own ci array agree
        f.seek(blob.ci_offset)
        ci = f.read(blob.ci_compressed_size)
        metas = blobmeta.decode(ci, blob.chunk_count, v2=False)
        for ref in unique_chunks(tree)[0].values():
            m = metas[ref.index]
            assert (m.compressed_offset, m.compressed_size) == (ref.compressed_offset, ref.compressed_size)
            assert m.uncompressed_offset == ref.uncompressed_offset
        toc = read_toc(f, os.path.getsize(path))
        f.seek(os.path.getsize(path) - blob.toc.size if blob.toc else 0)
        assert blob.toc is not None and hashlib.sha256(f.read(blob.toc.size)).digest() == blob.toc.digest
        digests = next(e for e in toc if e.name == b"blob.digest")
        assert {r.digest for r in unique_chunks(tree)[0].values()} == set(
            read_toc_entry(f, digests)[i : i + 32] for i in range(0, digests.uncompressed_size, 32))


def test_inlined_bootstrap_in_blob() -> None:
    with open(TOC_BLOB, "rb") as f:
        boot = Bootstrap(extract_bootstrap(f, os.path.getsize(TOC_BLOB)))
        tree = boot.to_tree()
        assert sorted(tree.root.children()) == [b"error.rs", b"lib.rs", b"logger.rs"]
        for _, node in tree.walk():
            for ref in node.chunks:
                assert read_chunk(f, tree.blobs[0], ref).startswith(b"// Copyright 2020")


def test_snapshotter_early_v6_bootstrap_layer() -> None:
    data = read_bootstrap_bytes(SNAPSHOTTER_V6)
    boot = Bootstrap(data)
    assert boot.sb.inos == 3517
    tree = boot.to_tree()
    assert len({id(n) for _, n in tree.walk()}) == 3517


def test_kernel_reads_fixture_like_we_do(tmp_path: Path) -> None:
    """Our unpack of the v2.2 fixture equals the kernel's view of it over our exported blob.data."""
    tree = load_tree(V6_BOOT)
    devices = export_blob_data(tree, NY / "blobs", tmp_path / "export")
    unpack_tree(tree, NY / "blobs", tmp_path / "ours")
    with erofs_mount(V6_BOOT, devices, tmp_path / "mnt") as mnt:
        assert diff(snapshot(tmp_path / "ours"), snapshot(mnt)) == []


def test_zran_blob_meta_ci_v2() -> None:
    data = (NY / "zran" / "233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta").read_bytes()
    header = blobmeta.MetaHeader.unpack(data[-blobmeta.HEADER_SIZE :])
    assert header.ci_entries == 163 and header.ctx_count == 21
    assert header.features & 0x4 and header.features & 0x8  # CHUNK_INFO_V2 | ZRAN
    chunks = blobmeta.decode(data, header.ci_entries, v2=True)
    assert all(c.flags & blobmeta.CI_V2_ZRAN for c in chunks)
    offsets = [c.uncompressed_offset for c in chunks]
    assert offsets == sorted(offsets) and all(o % 4096 == 0 for o in offsets)
    assert all(c.data >> 32 < header.ctx_count for c in chunks)  # every chunk names a zran context


def test_blob_meta_v1_round_trip() -> None:
    meta = blobmeta.ChunkMeta(compressed_offset=(1 << 39) + 7, compressed_size=0xABCDE + 1,
                              uncompressed_offset=0x123456000, uncompressed_size=0xFFFFFF + 1, compressed=True)
    assert blobmeta.decode(blobmeta.encode_v1(meta), 1, v2=False) == [meta]
