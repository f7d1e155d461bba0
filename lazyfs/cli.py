"""The ``lazyfs`` command line: one program, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import LazyfsError
from lazyfs.rafs.tree import Tree

Handler = Callable[[argparse.Namespace], int]


def _chunk_size(text: str) -> int:
    value = int(text, 0)
    if value & (value - 1) or not 0x1000 <= value <= 0x1000000:
        raise argparse.ArgumentTypeError("chunk size must be a power of two between 4 KiB and 16 MiB")
    return value


def cmd_build(args: argparse.Namespace) -> int:
    """Build a bootstrap and a data blob from a directory or a layer tar."""
    from lazyfs.rafs.builder import BuildOptions, build_layer, read_prefetch_list

    prefetch = read_prefetch_list(args.prefetch_list) if args.prefetch_list else ()
    options = BuildOptions(Compressor.parse(args.compressor), Digester.parse(args.digester), args.chunk_size, prefetch)
    result = build_layer(args.source, args.blob_dir, options)
    Path(args.bootstrap).write_bytes(result.bootstrap)
    if result.blob is None:
        print(f"bootstrap {args.bootstrap}: no file data, no blob written")
    else:
        print(f"bootstrap {args.bootstrap}, blob {result.blob_path} "
              f"({result.blob.chunk_count} chunks, {result.blob.compressed_size} bytes)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge per-layer bootstraps (lowest first) into one bootstrap."""
    from lazyfs.rafs.loader import load_tree
    from lazyfs.rafs.merge import merge_trees
    from lazyfs.rafs.writer import write_bootstrap

    blob_ids = args.blob_digests.split(",") if args.blob_digests else None
    if blob_ids is not None:
        blob_ids = [d.removeprefix("sha256:") for d in blob_ids]
    merged = merge_trees([load_tree(p) for p in args.bootstraps], blob_ids)
    Path(args.bootstrap).write_bytes(write_bootstrap(merged))
    print(f"bootstrap {args.bootstrap}: {len(merged.blobs)} blob(s)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show the tree, sizes, blobs and chunk counts of a bootstrap."""
    from lazyfs.inspect import describe, render_text

    info = describe(_open_tree(args))
    print(json.dumps(info, indent=2) if args.json else render_text(info))
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    """Materialise the tree of a bootstrap into a directory."""
    from lazyfs.rafs.export import unpack_tree

    unpack_tree(_open_tree(args), args.blob_dir, args.dest)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write each blob as <blob_id>.blob.data (uncompressed chunks at aligned offsets)."""
    from lazyfs.rafs.export import export_blob_data
    from lazyfs.rafs.loader import load_tree

    for path in export_blob_data(load_tree(args.bootstrap), args.blob_dir, args.out):
        print(path)
    return 0


def _open_tree(args: argparse.Namespace) -> Tree:
    from lazyfs.rafs.loader import load_tree

    return load_tree(args.bootstrap)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lazyfs", description="Lazy-loading Nydus images and P2P distribution.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("build", cmd_build, "Build a RAFS v6 bootstrap and data blob from a directory or a layer tar.")
    p.add_argument("source", help="directory or (uncompressed) layer tar file")
    p.add_argument("--bootstrap", required=True, help="where to write the bootstrap")
    p.add_argument("--blob-dir", required=True, help="directory that receives the blob, named by its sha256")
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    p.add_argument("--chunk-size", type=_chunk_size, default=0x100000, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--prefetch-list", help="file with one path per line to put in the prefetch table")

    p = add("merge", cmd_merge, "Merge per-layer bootstraps (lowest layer first) into one bootstrap.")
    p.add_argument("bootstraps", nargs="+", metavar="BOOT")
    p.add_argument("--bootstrap", required=True, help="where to write the merged bootstrap")
    p.add_argument("--blob-digests", help="comma-separated blob ids to use for each layer's blob")

    p = add("inspect", cmd_inspect, "Show what a bootstrap holds: tree, sizes, blobs, chunk counts.")
    p.add_argument("bootstrap", help="bootstrap, bootstrap layer tar(.gz), or blob with an inlined bootstrap")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("unpack", cmd_unpack, "Materialise a bootstrap's tree (data from local blobs) into DEST.")
    p.add_argument("bootstrap")
    p.add_argument("--blob-dir", required=True)
    p.add_argument("dest")

    p = add("export", cmd_export, "Write <blob_id>.blob.data files usable as kernel EROFS devices.")
    p.add_argument("bootstrap")
    p.add_argument("--blob-dir", required=True)
    p.add_argument("--out", required=True, help="output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lazyfs`` program."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except LazyfsError as exc:
        print(f"lazyfs {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"lazyfs {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
