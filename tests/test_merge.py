"""Tests for merging layer trees with OCI whiteout semantics."""

from __future__ import annotations

import dataclasses
import io
import stat
import tarfile

import pytest

from lazyfs.errors import BuildError
from lazyfs.rafs.blob import BlobWriter, read_chunk
from lazyfs.rafs.merge import merge_trees
from lazyfs.rafs.tarsource import build_tree_from_tar
from lazyfs.rafs.tree import Inode, Tree
from tests.test_tarsource import member as entry

CHUNK = 0x1000
BLOBS: dict[str, bytes] = {}  # blob id -> blob file bytes, for reading data back


def layer(*members: tuple[tarfile.TarInfo, bytes | None], chunk_size: int = CHUNK) -> Tree:
    """A layer tree built from a tar through a real blob writer."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    out = io.BytesIO()
    writer = BlobWriter(out, chunk_size=chunk_size)
    tree = build_tree_from_tar(io.BytesIO(raw.getvalue()), writer)
    blob = writer.finish()
    tree.blobs.append(blob)
    BLOBS[blob.blob_id] = out.getvalue()
    return tree


def names(tree: Tree, path: bytes = b"/") -> list[bytes]:
    return sorted(get(tree, path).children())


def get(tree: Tree, path: bytes) -> Inode:
    found = tree.lookup(path)
    assert found is not None, path
    return found


def data(tree: Tree, path: bytes) -> bytes:
    chunks = get(tree, path).chunks
    parts = []
    for c in chunks:
        blob = tree.blobs[c.blob_index]
        parts.append(read_chunk(io.BytesIO(BLOBS[blob.blob_id]), blob, c))
    return b"".join(parts)


def snapshot(tree: Tree) -> list[object]:
    """Everything merge could mutate, for checking the inputs stay untouched."""
    rows: list[object] = [
        (path, id(n), n.mode, n.uid, n.mtime, dict(n.xattrs), list(n.chunks), sorted(n.entries or {}))
        for path, n in tree.walk()
    ]
    return [*rows, list(tree.blobs), list(tree.prefetch)]


def test_whiteout_file_and_directory() -> None:
    low = layer(entry("a/f", data=b"f"), entry("a/g", data=b"g"), entry("d/x/y"), entry("keep"))
    up = layer(entry("a/.wh.f"), entry(".wh.d"), entry(".wh.missing"), entry("a/.wh.nothere"))
    merged = merge_trees([low, up])
    assert names(merged) == [b"a", b"keep"]
    assert names(merged, b"/a") == [b"g"]
    assert data(merged, b"/a/g") == b"g"


def test_whiteout_and_recreate_in_same_layer() -> None:
    low = layer(entry("f", data=b"old"), entry("d/old"))
    up = layer(entry(".wh.f"), entry("f", data=b"new"), entry(".wh.d"), entry("d/new"))
    merged = merge_trees([low, up])
    assert data(merged, b"/f") == b"new"
    assert names(merged, b"/d") == [b"new"]


def test_opaque_directory_keeps_same_layer_entries() -> None:
    low = layer(entry("d", tarfile.DIRTYPE, uid=1), entry("d/a"), entry("d/sub/b"), entry("other"))
    up = layer(entry("d", tarfile.DIRTYPE, mode=0o700, uid=2), entry("d/.wh..wh..opq"), entry("d/c", data=b"c"))
    merged = merge_trees([low, up])
    assert names(merged) == [b"d", b"other"]
    assert names(merged, b"/d") == [b"c"]
    assert get(merged, b"/d").mode == stat.S_IFDIR | 0o700 and get(merged, b"/d").uid == 2


def test_overlayfs_opaque_xattr() -> None:
    opaque, _ = entry("d", tarfile.DIRTYPE)
    opaque.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.k": "v"}
    merged = merge_trees([layer(entry("d/a")), layer((opaque, None), entry("d/b"))])
    assert names(merged, b"/d") == [b"b"]
    assert get(merged, b"/d").xattrs == {b"user.k": b"v"}


def test_whiteouts_never_appear_in_result() -> None:
    merged = merge_trees([
        layer(entry(".wh.x"), entry("p", data=b"file")),
        layer(entry("p/.wh..wh..opq"), entry("p/.wh.q"), entry("p/r")),
    ])
    paths = [path for path, _ in merged.walk()]
    assert paths == [b"/", b"/p", b"/p/r"]


def test_file_and_directory_replace_each_other() -> None:
    low = layer(entry("p", data=b"was a file"), entry("q/x", data=b"x"))
    up = layer(entry("p/y", data=b"y"), entry("q", data=b"now a file"))
    merged = merge_trees([low, up])
    assert names(merged, b"/p") == [b"y"] and data(merged, b"/p/y") == b"y"
    assert not get(merged, b"/q").is_dir and data(merged, b"/q") == b"now a file"


def test_directory_over_directory_merges_children_and_takes_upper_attrs() -> None:
    upper_dir, _ = entry("d", tarfile.DIRTYPE, mode=0o750, uid=5, gid=6, mtime=1234)
    upper_dir.pax_headers = {"SCHILY.xattr.user.up": "1"}
    lower_dir, _ = entry("d", tarfile.DIRTYPE, mode=0o755, uid=1, mtime=1)
    lower_dir.pax_headers = {"SCHILY.xattr.user.low": "1"}
    low = layer((lower_dir, None), entry("d/a", data=b"a"), entry("d/both", data=b"low"))
    up = layer((upper_dir, None), entry("d/b", data=b"b"), entry("d/both", data=b"up"))
    merged = merge_trees([low, up])
    d = get(merged, b"/d")
    assert names(merged, b"/d") == [b"a", b"b", b"both"]
    assert (d.mode, d.uid, d.gid, d.mtime) == (stat.S_IFDIR | 0o750, 5, 6, 1234)
    assert d.xattrs == {b"user.up": b"1"}
    assert (data(merged, b"/d/a"), data(merged, b"/d/both")) == (b"a", b"up")


def test_hardlinks_stay_shared_and_inputs_are_untouched() -> None:
    low = layer(entry("bin/a", data=b"tool"), entry("bin/b", tarfile.LNKTYPE, linkname="bin/a"), entry("c"))
    up = layer(entry("x/one", data=b"1"), entry("x/two", tarfile.LNKTYPE, linkname="x/one"), entry(".wh.c"))
    before = [snapshot(low), snapshot(up)]
    merged = merge_trees([low, up], [f"{1:064x}", f"{2:064x}"])
    assert get(merged, b"/bin/a") is get(merged, b"/bin/b")
    assert get(merged, b"/x/one") is get(merged, b"/x/two")
    assert get(merged, b"/bin/a") is not get(low, b"/bin/a")
    assert [snapshot(low), snapshot(up)] == before


def test_unused_middle_blob_is_dropped_and_indexes_renumbered() -> None:
    bottom = layer(entry("a", data=b"A" * 5000))
    middle = layer(entry("b", data=b"B" * 5000))
    top = layer(entry(".wh.b"), entry("c", data=b"C" * 9000))
    merged = merge_trees([bottom, middle, top])
    assert merged.blobs == [bottom.blobs[0], top.blobs[0]]
    assert {c.blob_index for c in get(merged, b"/c").chunks} == {1}
    assert {c.blob_index for c in get(merged, b"/a").chunks} == {0}
    assert data(merged, b"/a") == b"A" * 5000 and data(merged, b"/c") == b"C" * 9000
    assert all(c.blob_index == 0 for c in get(top, b"/c").chunks)


def test_layers_without_data_keep_blob_table_compact() -> None:
    merged = merge_trees([layer(entry("d", tarfile.DIRTYPE)), layer(entry("f", data=b"x"))])
    assert len(merged.blobs) == 1 and get(merged, b"/f").chunks[0].blob_index == 0


def test_blob_ids_override() -> None:
    ids = [f"{i:064x}" for i in (10, 11)]
    low, up = layer(entry("a", data=b"a")), layer(entry("b", data=b"b"))
    merged = merge_trees([low, up], ["sha256:" + ids[0], ids[1]])
    assert [b.blob_id for b in merged.blobs] == ids
    assert merged.blobs[1] == dataclasses.replace(up.blobs[0], blob_id=ids[1])
    assert low.blobs[0].blob_id != ids[0]


def test_blob_ids_validation() -> None:
    layers = [layer(entry("a", data=b"a"))]
    with pytest.raises(BuildError, match="2 blob ids given for 1 layers"):
        merge_trees(layers, ["0" * 64, "1" * 64])
    with pytest.raises(BuildError, match="not 64 lowercase hex"):
        merge_trees(layers, ["ABC"])


def test_identical_blobs_are_listed_once() -> None:
    first = layer(entry("a", data=b"same"))
    second = layer(entry("a", data=b"same"))
    merged = merge_trees([first, second])
    assert merged.blobs == first.blobs


def test_chunk_size_mismatch() -> None:
    with pytest.raises(BuildError, match="different chunk sizes: 0x1000, 0x2000"):
        merge_trees([layer(entry("a")), layer(entry("b"), chunk_size=0x2000)])


def test_prefetch_union() -> None:
    low, up = layer(entry("a")), layer(entry("b"))
    low.prefetch = [b"/a", b"/"]
    up.prefetch = [b"/b", b"/a"]
    assert merge_trees([low, up]).prefetch == [b"/a", b"/", b"/b"]


def test_no_layers() -> None:
    with pytest.raises(BuildError, match="no layers"):
        merge_trees([])


def test_hostile_trees() -> None:
    loop = Tree()
    sub = Inode.directory()
    sub.children()[b"self"] = sub
    loop.root.children()[b"d"] = sub
    with pytest.raises(BuildError, match="directory loop"):
        merge_trees([loop])
    bad_ref = layer(entry("a", data=b"a"))
    bad_ref.blobs.clear()
    with pytest.raises(BuildError, match="refers to blob 0, the layer has 0"):
        merge_trees([bad_ref])


def test_deep_tree_does_not_recurse() -> None:
    deep = Tree()
    node = deep.root
    for _ in range(5000):
        node = node.children().setdefault(b"d", Inode.directory())
    merged = merge_trees([deep, deep])
    assert sum(1 for _ in merged.walk()) == 5001
