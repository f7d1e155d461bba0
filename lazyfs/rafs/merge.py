"""Merge per-layer trees into one image tree, like ``nydus-image merge``.

OCI whiteouts are applied: ``.wh.<name>`` hides ``<name>`` from lower layers, ``.wh..wh..opq`` (or
the overlayfs xattr ``trusted.overlay.opaque=y``) hides everything lower in its directory. Markers
never reach the result. Input trees are not modified.
"""

from __future__ import annotations

import dataclasses
import re

from lazyfs.errors import BuildError
from lazyfs.rafs.tree import BlobInfo, ChunkRef, Inode, Tree

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def merge_trees(layers: list[Tree], blob_ids: list[str] | None = None) -> Tree:
    """Merge *layers* (lowest first) into a new tree.

    *blob_ids*, one per layer, replaces the id of each layer's data blob (``--blob-digests``).
    Unused blobs are dropped and chunk blob indexes renumbered.
    """
    if not layers:
        raise BuildError("no layers to merge")
    chunk_size = _common_chunk_size(layers)
    blobs, blob_maps = _blob_table(layers, blob_ids)
    result = Tree(chunk_size=chunk_size)
    for n, (layer, blob_map) in enumerate(zip(layers, blob_maps, strict=True)):
        if not layer.root.is_dir:
            raise BuildError(f"layer {n}: root is not a directory")
        _Layer(blob_map).apply(result.root, layer.root)
    result.blobs = _drop_unused_blobs(result, blobs)
    result.prefetch = list(dict.fromkeys(path for layer in layers for path in layer.prefetch))
    return result


def _common_chunk_size(layers: list[Tree]) -> int:
    sizes = {layer.chunk_size for layer in layers} | {b.chunk_size for layer in layers for b in layer.blobs}
    if len(sizes) != 1:
        raise BuildError(f"layers use different chunk sizes: {', '.join(hex(s) for s in sorted(sizes))}")
    return sizes.pop()


def _blob_table(layers: list[Tree], blob_ids: list[str] | None) -> tuple[list[BlobInfo], list[list[int]]]:
    """All layers' blobs (identical ones once) and, per layer, local -> merged blob index."""
    if blob_ids is not None and len(blob_ids) != len(layers):
        raise BuildError(f"{len(blob_ids)} blob ids given for {len(layers)} layers")
    blobs: list[BlobInfo] = []
    index: dict[str, int] = {}
    maps = []
    for n, layer in enumerate(layers):
        layer_blobs = layer.blobs if blob_ids is None else _renamed(layer.blobs, blob_ids[n], n)
        maps.append([_add_blob(blobs, index, blob) for blob in layer_blobs])
    return blobs, maps


def _renamed(blobs: list[BlobInfo], blob_id: str, layer: int) -> list[BlobInfo]:
    """The layer's blob with its id replaced (accepts a ``sha256:`` digest)."""
    blob_id = blob_id.removeprefix("sha256:")
    if not _BLOB_ID.fullmatch(blob_id):
        raise BuildError(f"layer {layer}: blob id {blob_id!r} is not 64 lowercase hex digits")
    if len(blobs) > 1:
        raise BuildError(f"layer {layer} has {len(blobs)} blobs; a blob id override needs exactly one")
    return [dataclasses.replace(blob, blob_id=blob_id) for blob in blobs]


def _add_blob(blobs: list[BlobInfo], index: dict[str, int], blob: BlobInfo) -> int:
    found = index.get(blob.blob_id)
    if found is None:
        found = index[blob.blob_id] = len(blobs)
        blobs.append(blob)
    elif blobs[found] != blob:
        raise BuildError(f"blob {blob.blob_id} appears in several layers with different properties")
    return found


class _Layer:
    """Copies one layer's inodes into the result, keeping its hardlinks shared."""

    def __init__(self, blob_map: list[int]) -> None:
        self.blob_map = blob_map
        self.copies: dict[int, Inode] = {}  # id(input inode) -> its copy, for hardlinks
        self.seen_dirs: set[int] = set()  # id(input directory), to refuse directory loops

    def apply(self, lower: Inode, upper: Inode) -> None:
        """Merge directory *upper* of this layer over result directory *lower*."""
        stack = [(lower, upper)]
        while stack:
            low, up = stack.pop()
            self._visit(up)
            if not up.implicit:  # a layer's unlisted parent directory keeps the lower attributes
                _take_attrs(low, up)
            entries = low.children()
            if _is_opaque(up):
                entries.clear()
            for name in up.children():
                if name.startswith(WHITEOUT_PREFIX):
                    entries.pop(name[len(WHITEOUT_PREFIX) :], None)
            for name, child in up.children().items():
                if name.startswith(WHITEOUT_PREFIX):
                    continue
                old = entries.get(name)
                if child.is_dir and old is not None and old.is_dir:
                    stack.append((old, child))
                else:
                    entries[name] = self.copy(child)

    def copy(self, node: Inode) -> Inode:
        """A copy of the subtree at *node* without whiteout markers."""
        root = self._copy_inode(node)
        stack = [(node, root)]
        while stack:
            src, dst = stack.pop()
            for name, child in (src.entries or {}).items():
                if name.startswith(WHITEOUT_PREFIX):
                    continue
                copied = dst.children()[name] = self._copy_inode(child)
                if child.is_dir:
                    stack.append((child, copied))
        return root

    def _visit(self, directory: Inode) -> None:
        if id(directory) in self.seen_dirs:
            raise BuildError("layer tree reaches one directory twice (directory loop)")
        self.seen_dirs.add(id(directory))

    def _copy_inode(self, node: Inode) -> Inode:
        found = self.copies.get(id(node))
        if found is not None:
            return found
        if node.is_dir:
            self._visit(node)
        copied = dataclasses.replace(
            node,
            xattrs=_clean_xattrs(node),
            chunks=[self._remap(c) for c in node.chunks],
            entries=None if node.entries is None else {},
        )
        if not node.is_dir:
            self.copies[id(node)] = copied
        return copied

    def _remap(self, chunk: ChunkRef) -> ChunkRef:
        if not 0 <= chunk.blob_index < len(self.blob_map):
            raise BuildError(f"chunk refers to blob {chunk.blob_index}, the layer has {len(self.blob_map)}")
        return dataclasses.replace(chunk, blob_index=self.blob_map[chunk.blob_index])


def _is_opaque(node: Inode) -> bool:
    return OPAQUE_MARKER in node.children() or node.xattrs.get(OVERLAY_OPAQUE) == b"y"


def _clean_xattrs(node: Inode) -> dict[bytes, bytes]:
    """The inode's xattrs without an overlayfs opaque marker."""
    if node.is_dir and node.xattrs.get(OVERLAY_OPAQUE) == b"y":
        return {k: v for k, v in node.xattrs.items() if k != OVERLAY_OPAQUE}
    return dict(node.xattrs)


def _take_attrs(dst: Inode, src: Inode) -> None:
    """Give result directory *dst* the attributes of upper directory *src*, minus opaque markers."""
    dst.take_attrs(src)
    dst.xattrs = _clean_xattrs(src)


def _drop_unused_blobs(tree: Tree, blobs: list[BlobInfo]) -> list[BlobInfo]:
    """Keep only blobs that chunks use, in order, renumbering every chunk's blob index."""
    inodes = list({id(node): node for _, node in tree.walk() if node.chunks}.values())
    used = sorted({c.blob_index for node in inodes for c in node.chunks})
    if used == list(range(len(used))):
        return blobs[: len(used)]
    renumber = {old: new for new, old in enumerate(used)}
    for node in inodes:
        node.chunks = [dataclasses.replace(c, blob_index=renumber[c.blob_index]) for c in node.chunks]
    return [blobs[i] for i in used]
