"""``lazyfs inspect``: describe what a bootstrap holds, as text or JSON."""

from __future__ import annotations

import stat
from typing import Any

from lazyfs.rafs.tree import Inode, Tree

_TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def _path(p: bytes) -> str:
    return p.decode("utf-8", "backslashreplace")


def _entry(path: bytes, node: Inode) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": _path(path), "type": _TYPE_NAMES.get(stat.S_IFMT(node.mode), "unknown"),
        "mode": f"{stat.S_IMODE(node.mode):04o}", "uid": node.uid, "gid": node.gid, "mtime": node.mtime,
        "size": node.size,
    }
    if node.chunks:
        entry["chunks"] = len(node.chunks)
    if node.target:
        entry["target"] = _path(node.target)
    if node.rdev:
        entry["rdev"] = node.rdev
    if node.xattrs:
        entry["xattrs"] = sorted(_path(k) for k in node.xattrs)
    return entry


def describe(tree: Tree) -> dict[str, Any]:
    """A JSON-ready description: blobs, totals and every entry."""
    entries = [_entry(path, node) for path, node in tree.walk()]
    return {
        "chunk_size": tree.chunk_size,
        "inodes": len({id(node) for _, node in tree.walk()}),
        "files": sum(1 for e in entries if e["type"] == "file"),
        "bytes": sum(e["size"] for e in entries if e["type"] == "file"),
        "blobs": [
            {
                "id": b.blob_id, "chunks": b.chunk_count, "compressor": b.compressor.label,
                "digester": b.digester.label, "compressed_size": b.compressed_size,
                "uncompressed_size": b.uncompressed_size, "features": f"{b.features:#x}",
            }
            for b in tree.blobs
        ],
        "prefetch": [_path(p) for p in tree.prefetch],
        "entries": entries,
    }


def render_text(info: dict[str, Any]) -> str:
    """A human-readable listing of :func:`describe`'s output."""
    lines = [
        f"chunk size {info['chunk_size']}, {info['inodes']} inodes, {info['files']} files, "
        f"{info['bytes']} bytes of file data",
        f"{len(info['blobs'])} blob(s):",
    ]
    lines += [
        f"  [{i}] {b['id']} {b['chunks']} chunks, {b['compressed_size']} B stored, "
        f"{b['uncompressed_size']} B uncompressed ({b['compressor']}, {b['digester']})"
        for i, b in enumerate(info["blobs"])
    ]
    if info["prefetch"]:
        lines.append("prefetch: " + " ".join(info["prefetch"]))
    for e in info["entries"]:
        extra = f" -> {e['target']}" if "target" in e else ""
        chunks = f" [{e['chunks']} chunks]" if "chunks" in e else ""
        owner = f"{e['uid']}:{e['gid']}"
        lines.append(f"{e['type']:7} {e['mode']} {owner:>11} {e['size']:>12} {e['path']}{extra}{chunks}")
    return "\n".join(lines)
