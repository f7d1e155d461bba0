"""The ``lazyfs`` command line: one program, one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
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
from lazyfs.fuse.records import DEFAULT_CACHE_DIR
from lazyfs.progress import Progress, human
from lazyfs.rafs.tree import Tree

if TYPE_CHECKING:
    from lazyfs.fuse.daemon import MountOptions
    from lazyfs.registry.client import RegistryClient
    from lazyfs.registry.reference import ImageReference
    from snapshotter.containerd_client import Containerd

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
    from lazyfs.rafs.builder import BuildOptions, read_prefetch_list

    prefetch = read_prefetch_list(args.prefetch_list) if args.prefetch_list else ()
    options = BuildOptions(Compressor.parse(args.compressor), Digester.parse(args.digester), args.chunk_size, prefetch)
    async with _client(args, args.source) as src, _client(args, args.target) as dst:
        result = await convert_image(src, dst, args.source, args.target, platform=args.platform, options=options,
                                     progress=Progress(), work_dir=args.work_dir)
    print(f"{result.reference}@{result.manifest_digest}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount a Nydus image; return once the mount is usable."""
    from lazyfs.fuse.control import signal_ready, spawn_daemon

    mountpoint = Path(args.mountpoint).resolve()
    if not mountpoint.is_dir():
        raise LazyfsError(f"mountpoint {mountpoint} is not a directory")
    if not args.foreground:
        spawn_daemon(args.argv, mountpoint)
        print(f"mounted {args.source} at {mountpoint}")
        return 0
    _log_to_stderr()
    options = _mount_options(args, mountpoint)
    from lazyfs.fuse.daemon import run_daemon

    ready = (lambda: signal_ready(args.ready_fd)) if args.ready_fd is not None else (lambda: None)
    trio.run(run_daemon, options, ready)
    return 0


def _mount_options(args: argparse.Namespace, mountpoint: Path) -> MountOptions:
    from lazyfs.chunks.fetcher import FetchOptions
    from lazyfs.fuse.daemon import MountOptions
    from lazyfs.fuse.source import SourceSpec
    from lazyfs.rafs.builder import read_prefetch_list

    backend = args.backend or ("dir" if args.blob_dir else "registry")
    source = SourceSpec(args.source, backend, args.image, Path(args.blob_dir) if args.blob_dir else None,
                        args.plain_http, args.platform, args.username, args.password, args.peer_proxy)
    prefetch = read_prefetch_list(args.prefetch_list) if args.prefetch_list else ()
    return MountOptions(source, mountpoint, Path(args.cache_dir), args.mode, prefetch, args.prefetch_all,
                        args.prefetch_bandwidth, FetchOptions(read_timeout=args.read_timeout, amplify=args.amplify_io))


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount a lazyfs mount and stop its daemon."""
    from lazyfs.fuse.control import unmount

    unmount(Path(args.mountpoint))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """List mounts with bytes read, bytes fetched, cache hit ratio and in-flight fetches."""
    from lazyfs.fuse.control import status

    mounts = status()
    if args.json:
        print(json.dumps(mounts, indent=2))
        return 0
    print(f"{'MOUNTPOINT':30} {'MODE':5} {'READ':>10} {'FETCHED':>10} {'HIT%':>6} {'INFLIGHT':>8}  SOURCE")
    for m in mounts:
        if m["state"] != "running":
            print(f"{m['mountpoint']:30} {m['state']}  {m['source']}")
            continue
        ratio = "-" if m["cache_hit_ratio"] is None else f"{100 * m['cache_hit_ratio']:.1f}"
        print(f"{m['mountpoint']:30} {m['mode']:5} {human(m['bytes_read']):>10} {human(m['bytes_fetched']):>10} "
              f"{ratio:>6} {m['in_flight']:>8}  {m['source']}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Print the files a fuse mount's readers opened, in first-open order: a prefetch list."""
    from lazyfs.fuse.control import trace

    for path in trace(Path(args.mountpoint).resolve()):
        print(path)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List or garbage-collect the chunk cache."""
    from lazyfs.chunks.cache import CacheManager

    manager = CacheManager(args.cache_dir)
    try:
        if args.action == "gc":
            for blob_id in manager.gc(args.limit):
                print(f"evicted {blob_id}")
            return 0
        entries = manager.ls()
        if args.json:
            print(json.dumps([dataclasses.asdict(e) | {"in_use": e.in_use} for e in entries], indent=2, default=str))
            return 0
        print(f"{'BLOB':64} {'DISK':>10} {'READY':>13} IN-USE")
        for e in entries:
            print(f"{e.blob_id:64} {human(e.disk_bytes):>10} {e.ready_chunks:>6}/{e.chunk_count:<6} "
                  f"{'yes' if e.in_use else 'no'}")
    finally:
        manager.close()
    return 0


def cmd_snapshotter(args: argparse.Namespace) -> int:
    """Serve containerd's snapshots API on a unix socket (register it as a proxy plugin)."""
    from snapshotter.server import load_config, serve

    _log_to_stderr()
    serve(load_config(args.config, root=args.root, address=args.address))
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    """Run a P2P scheduler (Dragonfly's scheduler.v2 API)."""
    from scheduler.server import load_config, run

    run(load_config(Path(args.config) if args.config else None, listen=args.listen, log_level=args.log_level))
    return 0


def cmd_preheat(args: argparse.Namespace) -> int:
    """Ask a scheduler to have its seed peers fetch every blob of an image (Dragonfly's preheat)."""
    from lazyfs.registry.auth import load_docker_credentials
    from lazyfs.registry.reference import ImageReference
    from p2p.api import scheduler
    from scheduler.preheat import call_preheat, manifest_url

    ref = ImageReference.parse(args.ref)
    request = scheduler.PreheatImageRequest(url=manifest_url(ref, args.plain_http), platform=args.platform,
                                            scope=args.scope)
    login = (args.username, args.password or "") if args.username else None
    if login is None and (stored := load_docker_credentials(ref.registry)):
        login = (stored.username, stored.password)
    if login:
        request.username, request.password = login
    if args.timeout:
        request.timeout.FromNanoseconds(int(args.timeout * 1e9))
    result = call_preheat(args.scheduler or ["127.0.0.1:8002"], request, args.timeout + 30 if args.timeout else None)
    blobs = "?" if result.tasks is None else str(result.tasks)
    size = "?" if result.bytes is None else human(result.bytes)
    print(f"preheated {args.ref}: {blobs} blobs (config and layers), {size}, on {result.seeds or '?'} seed peer(s) "
          f"via {result.scheduler} in {result.seconds:.1f} s")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Register the lazyfs snapshotter in containerd's config."""
    from snapshotter.server import DEFAULT_ADDRESS
    from snapshotter.setup import DEFAULT_CONTAINERD_CONFIG, merged_containerd_config, write_containerd_config

    config = Path(args.config) if args.config else DEFAULT_CONTAINERD_CONFIG
    if args.mirror:
        return _setup_mirror(args, config)
    address = args.address or str(DEFAULT_ADDRESS)
    if args.print:
        print(merged_containerd_config(config, args.name, address), end="")
        return 0
    changed = write_containerd_config(config, args.name, address)
    print(f"{'updated' if changed else 'unchanged'} {config}; restart containerd to apply")
    return 0


def _setup_mirror(args: argparse.Namespace, config: Path) -> int:
    """``setup containerd --mirror``: hosts.toml for the peer's registry mirror, and CRI's config_path."""
    from snapshotter.mirror import DEFAULT_HOSTS_DIR, configure_config_path, hosts_toml, setup_mirror

    hosts_dir = Path(args.hosts_dir) if args.hosts_dir else DEFAULT_HOSTS_DIR
    if args.print:
        directory, text = hosts_toml(args.mirror, args.registry)
        print(f"# {hosts_dir / directory / 'hosts.toml'}\n{text}\n# {config}")
        print(configure_config_path(config.read_text() if config.exists() else "", hosts_dir), end="")
        return 0
    for path, changed in setup_mirror(config, hosts_dir, args.mirror, args.registry):
        print(f"{'updated' if changed else 'unchanged'} {path}")
    print("restart containerd to apply; ctr needs --hosts-dir " + str(hosts_dir))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    """Pull an image into containerd, unpacked through a snapshotter that may serve layers lazily."""
    from lazyfs.registry.reference import ImageReference
    from snapshotter.containerd_client import Containerd

    ref = ImageReference.parse(args.ref)
    with Containerd(Path(args.address), args.namespace) as containerd:
        containerd.connect()
        return trio.run(_image_pull, args, ref, containerd)


async def _image_pull(args: argparse.Namespace, ref: ImageReference, containerd: Containerd) -> int:
    from snapshotter.pull import pull_image

    async with _client(args, args.ref) as registry:
        result = await pull_image(registry, containerd, ref, snapshotter=args.snapshotter, platform=args.platform,
                                  progress=Progress())
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(result.outcomes.items()))
    print(f"{result.name}@{result.manifest_digest}: unpacked into {args.snapshotter} ({counts or 'no layers'})")
    return 0


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


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

    p = add("mount", cmd_mount, "Mount a Nydus image read-only; file data is fetched chunk by chunk on first read.")
    p.add_argument("source", help="Nydus image reference in a registry, or a local bootstrap (with --blob-dir)")
    p.add_argument("mountpoint")
    p.add_argument("--blob-dir", help="local blobs, named by blob id (implies --backend dir)")
    p.add_argument("--image", help="for a local bootstrap: the Nydus image in a registry that holds its blobs")
    p.add_argument("--mode", choices=["fuse", "erofs"], default="fuse",
                   help="fuse: lazyfs serves the tree; erofs: the kernel reads metadata, lazyfs serves blob data")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="per-host chunk cache (shared by mounts)")
    p.add_argument("--backend", choices=["registry", "dir", "p2p"],
                   help="where chunks come from (p2p: through the local lazyfs peer's registry mirror)")
    p.add_argument("--peer-proxy", metavar="URL", default="http://127.0.0.1:4001",
                   help="--backend p2p: the local peer's proxy (default %(default)s)")
    p.add_argument("--prefetch-list", help="file of paths to prefetch in the background")
    p.add_argument("--prefetch-all", action="store_true", help="prefetch every chunk in the background")
    p.add_argument("--prefetch-bandwidth", type=_size, help="prefetch bandwidth limit in bytes/s (e.g. 50M)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds before a read that cannot be served fails")
    p.add_argument("--amplify-io", type=_size, default=0, metavar="SIZE",
                   help="a miss also fetches the following chunks within SIZE bytes (nydusd's amplify_io; default 0: "
                        "only what is read), fewer requests on high-latency links")
    p.add_argument("--foreground", action="store_true", help="run the mount daemon in this process")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _registry_options(p)

    p = add("umount", cmd_umount, "Unmount a lazyfs mount and stop its daemon.")
    p.add_argument("mountpoint")

    p = add("status", cmd_status, "List mounts: bytes read, bytes fetched, cache hit ratio, in-flight fetches.")
    p.add_argument("--json", action="store_true")

    p = add("trace", cmd_trace, "Print the files opened on a fuse mount, first-open order: a --prefetch-list.")
    p.add_argument("mountpoint")

    p = add("cache", cmd_cache, "Inspect or garbage-collect the chunk cache.")
    p.add_argument("action", choices=["ls", "gc"])
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--limit", type=_size, default=0, help="gc: evict unused blobs until the cache fits (default 0)")
    p.add_argument("--json", action="store_true")

    p = add("snapshotter", cmd_snapshotter, "Serve containerd's snapshots API (proxy plugin) on a unix socket.")
    p.add_argument("--address", help="unix socket to listen on (default /run/lazyfs/snapshotter.sock)")
    p.add_argument("--root", help="directory for snapshots and metadata (default /var/lib/lazyfs/snapshotter)")
    p.add_argument("--config", help="TOML config file (settings: root, address); options override it")

    p = add("scheduler", cmd_scheduler, "Run a P2P scheduler: picks the parents every peer downloads from.")
    p.add_argument("--listen", help="host:port to serve scheduler.v2 on (default 0.0.0.0:8002)")
    p.add_argument("--config", help="TOML config file ([scheduler] table); options override it")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")

    p = add("preheat", cmd_preheat, "Have seed peers fetch every layer of an image before it is pulled.")
    p.add_argument("ref", metavar="IMAGE_REF", help="image reference, e.g. 127.0.0.1:5000/app:1")
    p.add_argument("--scheduler", action="append", metavar="ADDR", help="scheduler host:port (repeatable; the "
                   "first that answers is used: it triggers the seeds for every layer itself; default 127.0.0.1:8002)")
    p.add_argument("--scope", choices=["single_seed_peer", "all_seed_peers"], default="single_seed_peer",
                   help="one seed per blob (by consistent hash, default) or every seed peer")
    p.add_argument("--timeout", type=float, help="seconds the scheduler may take (default: its seed download timeout)")
    _registry_options(p)

    p = add("setup", cmd_setup, "Configure another program to use lazyfs.")
    p.add_argument("component", choices=["containerd"], help="containerd: proxy snapshotter plugin and CRI settings")
    p.add_argument("--config", help="config file to edit (default /etc/containerd/config.toml)")
    p.add_argument("--address", help="the snapshotter's socket (default /run/lazyfs/snapshotter.sock)")
    p.add_argument("--name", default="lazyfs", help="proxy plugin name (CRI's snapshotter)")
    p.add_argument("--print", action="store_true", help="print the resulting config instead of writing it")
    p.add_argument("--mirror", metavar="URL", help="instead: pull through the lazyfs peer's registry mirror at URL "
                   "(e.g. http://127.0.0.1:4001): write hosts.toml and set CRI's registry config_path")
    p.add_argument("--registry", metavar="HOST", help="with --mirror: only this registry (host or URL; default: "
                   "all, via _default/hosts.toml)")
    p.add_argument("--hosts-dir", help="with --mirror: the hosts.toml directory (default /etc/containerd/certs.d)")

    p = add("image", cmd_image, "Work with images in containerd.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("pull", help="pull an image and unpack it through a snapshotter; Nydus layers stay "
                           "remote with the lazyfs snapshotter (ctr-remote rpull's job)")
    p.add_argument("ref", metavar="REF", help="image reference, e.g. 127.0.0.1:5000/app:1")
    p.add_argument("--address", default="/run/containerd/containerd.sock",
                   help="containerd's gRPC socket (default /run/containerd/containerd.sock)")
    p.add_argument("--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                   help="containerd namespace (default: $CONTAINERD_NAMESPACE or default)")
    p.add_argument("--snapshotter", default="lazyfs", help="snapshotter (proxy plugin name) to unpack into")
    _registry_options(p)

    from p2p.commands import register

    register(add, _log_to_stderr)
    return parser


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    p.add_argument("--chunk-size", type=_chunk_size, default=0x100000, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--prefetch-list", help="file with one path per line (e.g. from `lazyfs trace`) to put in the "
                   "prefetch table: mounts fetch those files first")


def _registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    p.add_argument("--platform", default="linux/amd64", help="platform to pick from an index (os/arch[/variant])")
    p.add_argument("--username", help="registry user (default: credentials from ~/.docker/config.json)")
    p.add_argument("--password", default=os.environ.get("LAZYFS_REGISTRY_PASSWORD"),
                   help="registry password (or LAZYFS_REGISTRY_PASSWORD)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lazyfs`` program."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.argv = raw[1:]
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
