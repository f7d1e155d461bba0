"""The remote (lazy) backend: Nydus images start before their data is downloaded.

- A Nydus data layer (``containerd.io/snapshot/nydus-blob``) being unpacked is committed at once under
  its target and answered ALREADY_EXISTS, so containerd never downloads it.
- The bootstrap layer (``nydus-bootstrap``) and every ordinary layer unpack as plain overlay snapshots.
- A container's snapshot whose parent chain holds a bootstrap layer gets an overlay whose only lowerdir
  is a lazyfs mount of that bootstrap (one mount daemon per image, shared by its containers), with the
  blobs read lazily from the image's registry. The mount starts in the background as soon as the bootstrap
  layer is committed (the end of the pull), so the first container usually finds it ready.

Mount daemons are separate processes: they outlive a snapshotter restart; :meth:`NydusBackend.recover`
adopts (or mounts again) at start those that containers still sit on, any other is adopted at its next use.
One daemon process always waits on standby (:class:`lazyfs.fuse.control.Standby`), so a mount does not
wait for Python to start; a used standby is replaced a few seconds later, not while its container starts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx

from lazyfs.errors import LazyfsError
from lazyfs.fuse.control import Standby, spawn_daemon
from lazyfs.fuse.records import find_record
from lazyfs.rafs.reader import Bootstrap
from lazyfs.registry.reference import ImageReference, api_host
from snapshotter.backend import Mount
from snapshotter.errors import AlreadyExists, FailedPrecondition, SnapshotError, Unavailable
from snapshotter.log import fields, log
from snapshotter.overlay import Layout, OverlayBackend
from snapshotter.store import Kind, Snapshot, Store, Usage

LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
LABEL_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
LABEL_REMOTE = "containerd.io/snapshot/lazyfs.remote"
BOOTSTRAP_PATHS = ("image/image.boot", "image.boot")
MOUNT_TIMEOUT = 60
"""Seconds a ``lazyfs mount`` or ``umount`` may take."""
REGISTRY_TIMEOUT = 5.0
"""Seconds the registry check before an image mount waits for an answer."""
STANDBY_DELAY = 5.0
"""Seconds after a mount took the standby daemon before the next one starts."""


@dataclasses.dataclass(frozen=True)
class LazyOptions:
    """How image mounts are made."""

    mode: str = "fuse"  # lazyfs mount mode: fuse | erofs
    cache_dir: Path | None = None  # lazyfs chunk cache (its default when None)
    plain_http: tuple[str, ...] = ()  # registries (host:port, or host for any port) reached over plain HTTP
    backend: str = "registry"  # where mounts fetch chunks: registry | p2p (through the local lazyfs peer)
    peer_proxy: str = "http://127.0.0.1:4001"  # the p2p backend's peer proxy (registry mirror)


class NydusBackend:
    """Overlay snapshots, plus lazy mounts for Nydus images."""

    def __init__(self, layout: Layout, store: Store, options: LazyOptions) -> None:
        self.layout = layout
        self.store = store
        self.options = options
        self.overlay = OverlayBackend(layout)
        self._locks: dict[int, threading.Lock] = {}  # per bootstrap layer id: one mount or unmount at a time
        self._locks_guard = threading.Lock()
        self._unchecked: set[int] = set()  # image mounts started at pull time, no container on them yet
        self._standby: Standby | None = Standby()

    def prepare(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """Claim Nydus data layers; mount images lazily for containers; overlay for the rest."""
        target = snapshot.labels.get(LABEL_TARGET)
        if target and snapshot.labels.get(LABEL_NYDUS_BLOB) == "true":
            with self.store.transaction() as tx:
                tx.commit(snapshot.key, target, {**snapshot.labels, LABEL_REMOTE: "true"}, Usage())
            log.info("%s", fields(event="remote_layer", target=target, key=snapshot.key))
            raise AlreadyExists(f"target snapshot {target!r}: Nydus data layer, read lazily")
        return self.mounts(snapshot, parents)

    def mounts(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> list[Mount]:
        """An overlay over the image's lazyfs mount, when the snapshot sits on a Nydus image."""
        meta = _bootstrap_layer(snapshot, parents)
        if meta is None:
            return self.overlay.mounts(snapshot, parents)
        lower = str(self.ensure_mounted(meta, parents))
        if snapshot.kind == Kind.VIEW:
            return [Mount("bind", lower, ("ro", "rbind"))]
        upper = (f"workdir={self.layout.work(snapshot.id)}", f"upperdir={self.layout.fs(snapshot.id)}")
        return [Mount("overlay", "overlay", (*upper, f"lowerdir={lower}"))]

    def commit(self, snapshot: Snapshot) -> Usage:
        """The overlay backend's usage."""
        return self.overlay.commit(snapshot)

    def committed(self, snapshot: Snapshot, parents: Sequence[Snapshot]) -> None:
        """Start mounting a just-unpacked Nydus image in the background, for its first container."""
        if snapshot.labels.get(LABEL_NYDUS_BOOTSTRAP) == "true":
            threading.Thread(target=self._mount_early, args=(snapshot, parents), name=f"mount-{snapshot.id}",
                             daemon=True).start()

    def _mount_early(self, meta: Snapshot, parents: Sequence[Snapshot]) -> None:
        try:
            self.ensure_mounted(meta, parents, for_container=False)
        except SnapshotError as exc:  # the container's Prepare tries again and reports it
            log.warning("%s", fields(event="early_mount_failed", snapshot=meta.id, key=meta.key, error=str(exc)))

    def remove(self, snapshot: Snapshot) -> None:
        """Unmount the image mount of a bootstrap layer that goes away."""
        mountpoint = self.mountpoint(snapshot)
        with self._lock(snapshot):
            if mountpoint.exists() and (find_record(mountpoint) is not None or os.path.ismount(mountpoint)):
                self._lazyfs("umount", str(mountpoint))
                log.info("%s", fields(event="unmounted", snapshot=snapshot.id, mountpoint=mountpoint))
        with self._locks_guard:
            self._locks.pop(snapshot.id, None)
            self._unchecked.discard(snapshot.id)

    def recover(self) -> None:
        """At start: adopt live image mounts under containers' snapshots, mount dead ones again.

        A mount that fails is logged and left for the container's next Prepare or Mounts: it never stops
        the snapshotter from starting.
        """
        with self.store.transaction() as tx:
            chains = [(s, tx.parents(s)) for s in tx.all() if s.kind != Kind.COMMITTED]
        done: set[int] = set()
        for snapshot, parents in chains:
            meta = _bootstrap_layer(snapshot, parents)
            if meta is None or meta.id in done:
                continue
            done.add(meta.id)
            event = "adopted" if self._live(self.mountpoint(meta)) else "remounted"
            try:
                self.ensure_mounted(meta, parents)
            except SnapshotError as exc:
                log.warning("%s", fields(event="recover_failed", snapshot=meta.id, key=meta.key, error=str(exc)))
                continue
            log.info("%s", fields(event=event, snapshot=meta.id, mountpoint=self.mountpoint(meta)))

    # -- image mounts -------------------------------------------------------------------------------

    def mountpoint(self, meta: Snapshot) -> Path:
        """Where the image whose bootstrap layer is *meta* is mounted."""
        return self.layout.dir(meta.id) / "lazyfs"

    def _lock(self, meta: Snapshot) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(meta.id, threading.Lock())

    def ensure_mounted(self, meta: Snapshot, parents: Sequence[Snapshot], *, for_container: bool = True) -> Path:
        """The image's lazyfs mount, adopted when its daemon lives, mounted (again) otherwise.

        A mount made for no container (at pull time) is checked against its registry again when its first
        container comes, as a mount made for that container would have been.
        """
        with self._lock(meta):
            mountpoint = self._ensure_mounted(meta, parents)
            if not for_container:
                self._unchecked.add(meta.id)
            elif meta.id in self._unchecked:
                image = self._image_ref(meta, parents)
                _check_registry(image, *self._registry(image))
                self._unchecked.discard(meta.id)
            return mountpoint

    def _ensure_mounted(self, meta: Snapshot, parents: Sequence[Snapshot]) -> Path:
        mountpoint = self.mountpoint(meta)
        if self._live(mountpoint):
            return mountpoint
        if find_record(mountpoint) is not None or os.path.ismount(mountpoint):
            self._lazyfs("umount", str(mountpoint), check=False)  # a dead daemon's leftovers
        mountpoint.mkdir(parents=True, exist_ok=True)
        bootstrap = self._bootstrap(meta)
        image = self._image_ref(meta, parents)
        args = [str(bootstrap), str(mountpoint), "--image", image, "--mode", self.options.mode]
        if self.options.cache_dir is not None:
            args += ["--cache-dir", str(self.options.cache_dir)]
        registry, plain_http = self._registry(image)
        if plain_http:
            args.append("--plain-http")
        if self.options.backend == "p2p":
            args += ["--backend", "p2p", "--peer-proxy", self.options.peer_proxy]
        _check_registry(image, registry, plain_http)
        try:
            spawn_daemon(args, mountpoint, timeout=MOUNT_TIMEOUT, standby=self._take_standby())
        except LazyfsError as exc:
            message = " ".join(str(exc).split())[-500:]
            raise Unavailable(f"cannot mount Nydus image {image} from registry {registry}: {message}") from None
        log.info("%s", fields(event="mounted", snapshot=meta.id, image=image, mountpoint=mountpoint))
        return mountpoint

    def _registry(self, image: str) -> tuple[str, bool]:
        """The registry of *image*, and whether it is reached over plain HTTP."""
        registry = ImageReference.parse(image).registry
        return registry, registry in self.options.plain_http or registry.rsplit(":", 1)[0] in self.options.plain_http

    def _take_standby(self) -> Standby | None:
        """The waiting daemon, if any; a new one starts :data:`STANDBY_DELAY` seconds later."""
        with self._locks_guard:
            standby, self._standby = self._standby, None
        timer = threading.Timer(STANDBY_DELAY, self._replenish)
        timer.daemon = True
        timer.start()
        return standby

    def _replenish(self) -> None:
        with self._locks_guard:
            if self._standby is None:
                self._standby = Standby()

    @staticmethod
    def _live(mountpoint: Path) -> bool:
        """Whether a running daemon serves *mountpoint*."""
        record = find_record(mountpoint)
        return record is not None and record.alive() and os.path.ismount(mountpoint)

    def _bootstrap(self, meta: Snapshot) -> Path:
        """The image's bootstrap file, checked to be a RAFS v6 bootstrap the mount daemon can serve."""
        for name in BOOTSTRAP_PATHS:
            path = self.layout.fs(meta.id) / name
            if path.is_file():
                try:
                    Bootstrap.open(path)
                except (LazyfsError, OSError, ValueError) as exc:
                    raise FailedPrecondition(f"Nydus bootstrap layer {meta.key!r} is corrupt: {exc}") from None
                return path
        raise FailedPrecondition(f"Nydus bootstrap layer {meta.key!r} holds no image/image.boot")

    def _image_ref(self, meta: Snapshot, parents: Sequence[Snapshot]) -> str:
        for snapshot in (meta, *parents):
            ref = snapshot.labels.get(LABEL_IMAGE_REF) or snapshot.labels.get(LABEL_STARGZ_REF)
            if ref:
                return ref
        raise FailedPrecondition(
            f"failed to find the image reference of Nydus layer {meta.key!r}: pull with CRI "
            f"(disable_snapshot_annotations = false) or `lazyfs image pull`, which label the layers"
        )

    def _lazyfs(self, *args: str, check: bool = True) -> None:
        try:
            proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], capture_output=True, text=True,
                                  timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"lazyfs {args[0]} did not finish within {MOUNT_TIMEOUT} s") from None
        if check and proc.returncode != 0:
            message = " ".join(proc.stderr.split())[-500:] or f"exit status {proc.returncode}"
            raise Unavailable(f"lazyfs {args[0]} failed: {message}")


def _check_registry(image: str, registry: str, plain_http: bool) -> None:
    """Unavailable unless *registry* answers (any HTTP status) within :data:`REGISTRY_TIMEOUT` seconds.

    The mount daemon reads blobs only when files are read; without this check a container would start on a
    mount whose every read fails.
    """
    url = f"{'http' if plain_http else 'https'}://{api_host(registry)}/v2/"
    try:
        httpx.get(url, timeout=REGISTRY_TIMEOUT, verify=not plain_http)  # no TLS: skip loading CA certificates
    except httpx.HTTPError as exc:
        raise Unavailable(f"registry {registry} of Nydus image {image} cannot be reached: "
                          f"{exc or type(exc).__name__}") from None


def _bootstrap_layer(snapshot: Snapshot, parents: Sequence[Snapshot]) -> Snapshot | None:
    """The Nydus bootstrap layer a container's (unlabelled) snapshot sits on, if any."""
    if snapshot.labels.get(LABEL_TARGET):
        return None
    return next((p for p in parents if p.labels.get(LABEL_NYDUS_BOOTSTRAP) == "true"), None)
