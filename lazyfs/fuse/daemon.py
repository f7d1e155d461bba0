"""The mount daemon: one process per mount, serving FUSE and a unix-socket API until unmounted.

``lazyfs mount`` starts it in the background and returns when it reports ready; with
``--foreground`` it runs in the calling process. SIGTERM, ``lazyfs umount`` and an external
``umount`` all end it cleanly: FUSE session closed, record removed, cache blobs released.

In ``fuse`` mode the FUSE filesystem is the mount. In ``erofs`` mode the daemon's FUSE filesystem
only serves blob device files (:mod:`lazyfs.fuse.blobdev`) in its private folder, and the kernel
EROFS driver mounts the bootstrap over loop devices on them (:mod:`lazyfs.fuse.kernel_mount`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from lazyfs import metrics
from lazyfs.chunks.cache import CacheManager
from lazyfs.chunks.fetcher import LATENCY_BUCKETS, ChunkFetcher, FetchOptions, open_fetcher
from lazyfs.fuse import kernel_mount
from lazyfs.fuse.api import ApiServer, Reply
from lazyfs.fuse.blobdev import BlobDevice, BlobDevicesFilesystem, device_name
from lazyfs.fuse.filesystem import RafsFilesystem
from lazyfs.fuse.records import MountRecord, mount_id
from lazyfs.fuse.source import SourceSpec, open_source
from lazyfs.fuse.stats import ReadStats
from lazyfs.rafs.reader import Bootstrap
from lazyfs.rafs.tree import ChunkRef

log = logging.getLogger(__name__)
FUSE_READAHEAD_KB = 4096  # the kernel's 128 KiB default makes sequential reads many small FUSE round trips
READAHEAD_CHUNKS = 4  # fetched ahead of a sequential reader in fuse mode (the kernel reads ahead in erofs mode)
FUSE_OPTIONS = frozenset({"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions", "allow_other"})
DEVICES_OPTIONS = frozenset({"fsname=lazyfs-devices", "subtype=lazyfs", "ro"})  # root only: loops run as root


@dataclass(frozen=True)
class MountOptions:
    """Everything a mount daemon needs."""

    source: SourceSpec
    mountpoint: Path
    cache_dir: Path
    mode: str = "fuse"
    prefetch: tuple[bytes, ...] = ()
    prefetch_all: bool = False
    prefetch_bandwidth: int | None = None
    fetch: FetchOptions = field(default_factory=FetchOptions)


class MountDaemon:
    """State shared by the FUSE filesystem, the API and prefetch."""

    def __init__(self, opts: MountOptions, boot: Bootstrap, fetcher: ChunkFetcher, nursery: trio.Nursery) -> None:
        self.opts = opts
        self.boot = boot
        self.fetcher = fetcher
        self.nursery = nursery
        self.stats = ReadStats()
        self.id = mount_id(opts.mountpoint)
        self.record = MountRecord(self.id, str(opts.mountpoint), opts.source.source, opts.mode, os.getpid(),
                                  time.time())
        self.prefetching = 0
        self.stopping = trio.Event()
        self.fs: pyfuse3.Operations | None = None  # the FUSE filesystem, once mounted

    def stop(self, reason: str) -> None:
        """Ask the daemon to unmount and exit."""
        if not self.stopping.is_set():
            log.info("event=shutdown reason=%s mount=%s", reason, self.id)
            self.stopping.set()

    # -- API ----------------------------------------------------------------------------------------

    def api(self) -> ApiServer:
        """The daemon's HTTP API."""
        return ApiServer({
            ("GET", "/api/v1/status"): self._status,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/api/v1/prefetch"): self._prefetch,
            ("GET", "/api/v1/trace"): self._trace,
            ("POST", "/api/v1/shutdown"): self._shutdown,
        })

    def status(self) -> dict[str, object]:
        """Mount, read and fetch figures as JSON."""
        m = self.fetcher.metrics
        lookups = m.cache_hits + m.cache_misses
        return {
            "id": self.id, "mountpoint": self.record.mountpoint, "source": self.record.source,
            "mode": self.opts.mode, "pid": self.record.pid, "uptime": round(time.time() - self.record.started, 3),
            "blobs": [b.blob_id for b in self.boot.blobs], "reads": self.stats.as_dict(),
            "bytes_read": self.stats.read_bytes, "bytes_fetched": m.backend_bytes,
            "cache_hit_ratio": round(m.cache_hits / lookups, 4) if lookups else None,
            "in_flight": m.in_flight, "prefetching": self.prefetching, "fetch": m.snapshot(),
        }

    async def _status(self, _: bytes) -> Reply:
        return Reply.json(self.status())

    async def _metrics(self, _: bytes) -> Reply:
        labels = {"mount": self.id}
        snap = self.fetcher.metrics.snapshot()
        plain = {k: v for k, v in snap.items() if isinstance(v, int | float) and k != "latency_sum"}
        lines = metrics.counters("lazyfs_fetch", plain, labels, gauges=("in_flight",))
        lines += metrics.counters("lazyfs_app", self.stats.as_dict(), labels)
        lines += metrics.histogram("lazyfs_fetch_latency_seconds", LATENCY_BUCKETS,
                                   self.fetcher.metrics.latency_counts, self.fetcher.metrics.latency_sum, labels)
        return Reply(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")

    async def _prefetch(self, body: bytes) -> Reply:
        try:
            request = json.loads(body or b"{}")
            paths = [os.fsencode(p) for p in request.get("paths", [])]
        except (ValueError, AttributeError, TypeError):
            return Reply.json({"error": 'expected {"paths": [...]} or {"all": true}'}, 400)
        refs = self.prefetch_refs(paths, bool(request.get("all")))
        self.nursery.start_soon(self.run_prefetch, refs)
        return Reply.json({"chunks": sum(len(r) for r in refs.values())}, 202)

    async def _trace(self, _: bytes) -> Reply:
        if not isinstance(self.fs, RafsFilesystem):
            return Reply.json({"error": "only fuse mounts see which files are opened"}, 409)
        paths = self.paths_of(list(self.fs.opened))
        return Reply.json({"files": [os.fsdecode(paths[nid]) for nid in self.fs.opened if nid in paths]})

    async def _shutdown(self, _: bytes) -> Reply:
        self.stop("api")
        return Reply.json({"ok": True}, 202)

    # -- prefetch -----------------------------------------------------------------------------------

    def prefetch_refs(self, paths: list[bytes], everything: bool) -> dict[int, list[ChunkRef]]:
        """Chunks of the files under *paths* (all files when *everything*), grouped by blob."""
        boot = self.boot
        if everything:
            return {i: boot.blob_chunks(i) for i in range(len(boot.blobs))}
        nids = []
        for path in paths:
            ino = boot.inode(boot.root_nid)
            for part in [p for p in path.split(b"/") if p]:
                nid = boot.lookup(ino, part) if ino.is_dir else None
                if nid is None:
                    log.warning("event=prefetch_missing path=%r", path)
                    break
                ino = boot.inode(nid)
            else:
                nids.append(ino.nid)
        out: dict[int, dict[int, ChunkRef]] = {}
        for nid in self.files_under(nids):
            for ref in boot.chunks(boot.inode(nid)):
                out.setdefault(ref.blob_index, {})[ref.index] = ref
        return {b: sorted(refs.values(), key=lambda r: r.compressed_offset) for b, refs in out.items()}

    def paths_of(self, nids: list[int]) -> dict[int, bytes]:
        """One absolute path of each of *nids* (found by walking the tree)."""
        wanted = set(nids)
        found: dict[int, bytes] = {}
        stack = [(self.boot.root_nid, b"")]
        while stack and len(found) < len(wanted):
            nid, path = stack.pop()
            for name, child, _ in self.boot.readdir(self.boot.inode(nid)):
                if name in (b".", b".."):
                    continue
                if child in wanted:
                    found.setdefault(child, path + b"/" + name)
                if self.boot.inode(child).is_dir:
                    stack.append((child, path + b"/" + name))
        return found

    def files_under(self, nids: list[int]) -> list[int]:
        """Regular files at or below *nids*."""
        files, seen, stack = [], set(), list(nids)
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            ino = self.boot.inode(nid)
            if ino.is_dir:
                stack += [n for name, n, _ in self.boot.readdir(ino) if name not in (b".", b"..")]
            elif stat.S_ISREG(ino.mode):
                files.append(nid)
        return files

    async def run_prefetch(self, refs: dict[int, list[ChunkRef]]) -> None:
        """Fetch *refs* in the background, behind on-demand reads."""
        self.prefetching += 1
        start = time.monotonic()
        try:
            for blob_index, chunks in refs.items():
                await self.fetcher.prefetch(self.boot.blobs[blob_index], chunks, self.opts.prefetch_bandwidth)
            log.info("event=prefetch_done mount=%s chunks=%d seconds=%.2f", self.id,
                     sum(len(c) for c in refs.values()), time.monotonic() - start)
        except Exception as exc:  # prefetch is best effort: reads fetch on demand anyway
            log.warning("event=prefetch_failed mount=%s error=%s", self.id, exc)
        finally:
            self.prefetching -= 1


def _initial_prefetch(daemon: MountDaemon) -> dict[int, list[ChunkRef]]:
    """What to prefetch at mount: the given paths, or everything, or the bootstrap's prefetch table."""
    boot, opts = daemon.boot, daemon.opts
    table = boot.prefetch_nids() if boot.sb.prefetch_table_size else []
    if opts.prefetch_all or boot.root_nid in table:
        return daemon.prefetch_refs([], True)
    refs = daemon.prefetch_refs(list(opts.prefetch), False)
    for nid in daemon.files_under(table):
        for ref in boot.chunks(boot.inode(nid)):
            refs.setdefault(ref.blob_index, []).append(ref)
    return refs


async def run_daemon(opts: MountOptions, ready: Callable[[], None] = lambda: None) -> None:
    """Mount, report ready, and serve until unmounted, terminated or shut down through the API."""
    cache = CacheManager(opts.cache_dir)
    try:
        async with open_source(opts.source, opts.cache_dir) as src:
            boot = Bootstrap.open(src.bootstrap)
            async with open_fetcher(src.backend, cache, opts.fetch, owner=mount_id(opts.mountpoint)) as fetcher:
                for i, blob in enumerate(boot.blobs):
                    await fetcher.register_blob(blob, boot.blob_chunks(i))
                async with trio.open_nursery() as nursery:
                    daemon = MountDaemon(opts, boot, fetcher, nursery)
                    await _serve(daemon, ready, src.bootstrap)
    finally:
        cache.close()


async def _serve(daemon: MountDaemon, ready: Callable[[], None], bootstrap: Path) -> None:
    opts = daemon.opts
    fs, target, options = _filesystem(daemon)
    pyfuse3.init(fs, str(target), options)
    daemon.fs = fs
    daemon.record.save()
    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(_fuse_main, inner.cancel_scope)
            if isinstance(fs, RafsFilesystem):
                inner.start_soon(set_readahead, fs, target, FUSE_READAHEAD_KB)
            await inner.start(daemon.api().serve, daemon.record.socket)
            inner.start_soon(_watch_signals, daemon)
            async with _kernel_mount(daemon, bootstrap, target):
                if opts.mode == "erofs":
                    inner.start_soon(_watch_unmount, daemon)
                inner.start_soon(daemon.run_prefetch, _initial_prefetch(daemon))
                log.info("event=mounted mount=%s mountpoint=%s source=%s mode=%s", daemon.id, opts.mountpoint,
                         opts.source.source, opts.mode)
                ready()
                await daemon.stopping.wait()
            pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
        (daemon.record.folder / "mount.json").unlink(missing_ok=True)
        daemon.nursery.cancel_scope.cancel()
        log.info("event=unmounted mount=%s", daemon.id)


async def set_readahead(fs: RafsFilesystem, mountpoint: Path, kib: int) -> None:
    """Raise the kernel readahead of the FUSE mount at *mountpoint* (best effort).

    The kernel caps readahead when it gets the FUSE INIT reply, so this waits until INIT was handled
    and the reply is through. The device number comes from /proc/self/mountinfo: a stat of the
    mountpoint would be a FUSE request. *mountpoint* is already absolute.
    """
    await fs.initialized.wait()
    bdi = _bdi(mountpoint)
    for _ in range(50):
        await trio.sleep(0.02)
        try:
            bdi.write_text(f"{kib}\n")
            if int(bdi.read_text()) == kib:
                log.info("event=readahead mountpoint=%s kib=%d", mountpoint, kib)
                return
        except (OSError, ValueError) as exc:
            log.info("event=readahead_unchanged mountpoint=%s error=%s", mountpoint, exc)
            return


def _bdi(mountpoint: Path) -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].replace("\\040", " ") == str(mountpoint):
            return Path("/sys/class/bdi") / fields[2] / "read_ahead_kb"
    return Path("/nonexistent")


def _filesystem(daemon: MountDaemon) -> tuple[pyfuse3.Operations, Path, set[str]]:
    """The FUSE filesystem of the daemon's mode, where to mount it, and its mount options."""
    boot = daemon.boot
    if daemon.opts.mode == "fuse":
        fs = RafsFilesystem(boot, daemon.fetcher, daemon.stats, readahead=(daemon.nursery, READAHEAD_CHUNKS))
        return fs, daemon.opts.mountpoint, set(FUSE_OPTIONS)
    if daemon.opts.mode != "erofs":
        raise ValueError(f"unknown mount mode {daemon.opts.mode!r}")
    devices = [BlobDevice.build(blob, boot.blob_chunks(i)) for i, blob in enumerate(boot.blobs)]
    folder = daemon.record.folder / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    return BlobDevicesFilesystem(devices, daemon.fetcher, daemon.stats), folder, set(DEVICES_OPTIONS)


def _kernel_mount(daemon: MountDaemon, bootstrap: Path, devices: Path) -> AbstractAsyncContextManager[object]:
    """In erofs mode, the kernel EROFS mount over the device files in *devices*; nothing in fuse mode."""
    if daemon.opts.mode != "erofs":
        return nullcontext()
    complete = {blob.blob_id: daemon.fetcher.complete_file(blob) for blob in daemon.boot.blobs}
    files = [complete[blob.blob_id] or devices / device_name(blob) for blob in daemon.boot.blobs]
    for blob, path in zip(daemon.boot.blobs, files, strict=True):
        log.info("event=blob_device mount=%s blob=%s device=%s", daemon.id, blob.blob_id, path)
    cached = [path for path in complete.values() if path is not None]
    return kernel_mount.erofs_mount(bootstrap, files, daemon.opts.mountpoint, buffered=cached)


async def _fuse_main(done: trio.CancelScope) -> None:
    """Serve FUSE requests until terminated or unmounted, then end the mount's tasks."""
    await pyfuse3.main()
    done.cancel()


async def _watch_signals(daemon: MountDaemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            daemon.stop(f"signal-{signum}")


async def _watch_unmount(daemon: MountDaemon) -> None:
    """Stop when the EROFS mount is unmounted behind the daemon's back."""
    await kernel_mount.wait_unmounted(daemon.opts.mountpoint)
    daemon.stop("unmounted")
