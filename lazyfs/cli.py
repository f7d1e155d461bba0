"""The ``lazyfs`` command line: one program, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from lazyfs.chunks.codec import Compressor
from lazyfs.chunks.digest import Digester
from lazyfs.errors import LazyfsError
from lazyfs.progress import Progress
from lazyfs.rafs.tree import Tree

if TYPE_CHECKING:
    from lazyfs.registry.client import RegistryClient

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

    if args.blob_dir:
        unpack_tree(_open_tree(args), args.blob_dir, args.dest)
        return 0
    with tempfile.TemporaryDirectory(prefix="lazyfs-unpack-") as tmp:
        unpack_tree(_open_tree(args, Path(tmp)), tmp, args.dest)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write each blob as <blob_id>.blob.data (uncompressed chunks at aligned offsets)."""
    from lazyfs.rafs.export import export_blob_data
    from lazyfs.rafs.loader import load_tree

    for path in export_blob_data(load_tree(args.bootstrap), args.blob_dir, args.out):
        print(path)
    return 0


def _open_tree(args: argparse.Namespace, blob_dir: Path | None = None) -> Tree:
    """The tree of a local bootstrap, or of a Nydus image in a registry (blobs into *blob_dir*)."""
    from lazyfs.rafs.loader import load_tree

    if os.path.exists(args.bootstrap):
        return load_tree(args.bootstrap)
    return trio.run(_open_remote_tree, args, blob_dir)


async def _open_remote_tree(args: argparse.Namespace, blob_dir: Path | None) -> Tree:
    from lazyfs.convert.remote import fetch_blobs, fetch_bootstrap, fetch_nydus_manifest
    from lazyfs.rafs.reader import Bootstrap

    async with _client(args, args.bootstrap) as client:
        manifest = await fetch_nydus_manifest(client, args.bootstrap, args.platform)
        tree = Bootstrap(await fetch_bootstrap(client, args.bootstrap, manifest), args.bootstrap).to_tree()
        if blob_dir is not None:
            await fetch_blobs(client, args.bootstrap, manifest, blob_dir, Progress())
    return tree


def _client(args: argparse.Namespace, ref: str) -> RegistryClient:
    from lazyfs.registry.auth import Credentials
    from lazyfs.registry.client import RegistryClient
    from lazyfs.registry.reference import ImageReference

    creds = Credentials(args.username, args.password) if args.username else None
    return RegistryClient(ImageReference.parse(ref).registry, credentials=creds, plain_http=args.plain_http)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an OCI/Docker image in a registry into a Nydus image in a registry."""
    return trio.run(_convert, args)


async def _convert(args: argparse.Namespace) -> int:
    from lazyfs.convert.converter import convert_image
    from lazyfs.rafs.builder import BuildOptions

    options = BuildOptions(Compressor.parse(args.compressor), Digester.parse(args.digester), args.chunk_size)
    async with _client(args, args.source) as src, _client(args, args.target) as dst:
        result = await convert_image(src, dst, args.source, args.target, platform=args.platform, options=options,
                                     progress=Progress(), work_dir=args.work_dir)
    print(f"{result.reference}@{result.manifest_digest}")
    return 0


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
    _build_options(p)
    p.add_argument("--prefetch-list", help="file with one path per line to put in the prefetch table")

    p = add("merge", cmd_merge, "Merge per-layer bootstraps (lowest layer first) into one bootstrap.")
    p.add_argument("bootstraps", nargs="+", metavar="BOOT")
    p.add_argument("--bootstrap", required=True, help="where to write the merged bootstrap")
    p.add_argument("--blob-digests", help="comma-separated blob ids to use for each layer's blob")

    p = add("inspect", cmd_inspect, "Show what a bootstrap holds: tree, sizes, blobs, chunk counts.")
    p.add_argument("bootstrap", help="bootstrap, bootstrap layer tar(.gz), blob with an inlined bootstrap, "
                   "or a Nydus image reference in a registry")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _registry_options(p)

    p = add("unpack", cmd_unpack, "Materialise the tree of a bootstrap or of a Nydus image reference into DEST.")
    p.add_argument("bootstrap", help="bootstrap file, or a Nydus image reference in a registry")
    p.add_argument("--blob-dir", help="local blobs (required for a bootstrap file; pulled for an image)")
    p.add_argument("dest")
    _registry_options(p)

    p = add("export", cmd_export, "Write <blob_id>.blob.data files usable as kernel EROFS devices.")
    p.add_argument("bootstrap")
    p.add_argument("--blob-dir", required=True)
    p.add_argument("--out", required=True, help="output directory")

    p = add("convert", cmd_convert, "Convert an OCI/Docker image in a registry into a Nydus image (nydusify).")
    p.add_argument("source", metavar="SRC_REF", help="image to convert, e.g. 127.0.0.1:5000/app:1")
    p.add_argument("target", metavar="DST_REF", help="where to push the Nydus image")
    _build_options(p)
    _registry_options(p)
    p.add_argument("--work-dir", help="directory for temporary layer files (default: system temp)")
    return parser


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    p.add_argument("--chunk-size", type=_chunk_size, default=0x100000, help="bytes per chunk (default 1 MiB)")


def _registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    p.add_argument("--platform", default="linux/amd64", help="platform to pick from an index (os/arch[/variant])")
    p.add_argument("--username", help="registry user (default: credentials from ~/.docker/config.json)")
    p.add_argument("--password", default=os.environ.get("LAZYFS_REGISTRY_PASSWORD"),
                   help="registry password (or LAZYFS_REGISTRY_PASSWORD)")


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
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
