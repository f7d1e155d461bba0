"""The remote (lazy) backend: Nydus images start before their data is downloaded.

- A Nydus data layer (``containerd.io/snapshot/nydus-blob``) being unpacked is committed at once under
  its target and answered ALREADY_EXISTS, so containerd never downloads it.
- The bootstrap layer (``nydus-bootstrap``) and every ordinary layer unpack as plain overlay snapshots.
- A container's snapshot whose parent chain holds a bootstrap layer gets an overlay whose only lowerdir
  is a lazyfs mount of that bootstrap (one mount daemon per image, shared by its containers), with the
  blobs read lazily from the image's registry.

Mount daemons are separate processes: they outlive a snapshotter restart; :meth:`NydusBackend.recover`
adopts (or mounts again) at start those that containers still sit on, any other is adopted at its next use.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from lazyfs.errors import LazyfsError
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

    def remove(self, snapshot: Snapshot) -> None:
        """Unmount the image mount of a bootstrap layer that goes away."""
        mountpoint = self.mountpoint(snapshot)
        if mountpoint.exists() and (find_record(mountpoint) is not None or os.path.ismount(mountpoint)):
            self._lazyfs("umount", str(mountpoint))
            log.info("%s", fields(event="unmounted", snapshot=snapshot.id, mountpoint=mountpoint))

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

    def ensure_mounted(self, meta: Snapshot, parents: Sequence[Snapshot]) -> Path:
        """The image's lazyfs mount, adopted when its daemon lives, mounted (again) otherwise."""
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
        registry = ImageReference.parse(image).registry
        plain_http = registry in self.options.plain_http or registry.rsplit(":", 1)[0] in self.options.plain_http
        if plain_http:
            args.append("--plain-http")
        if self.options.backend == "p2p":
            args += ["--backend", "p2p", "--peer-proxy", self.options.peer_proxy]
        _check_registry(image, registry, plain_http)
        try:
            self._lazyfs("mount", *args)
        except Unavailable as exc:
            raise Unavailable(f"cannot mount Nydus image {image} from registry {registry}: {exc}") from None
        log.info("%s", fields(event="mounted", snapshot=meta.id, image=image, mountpoint=mountpoint))
        return mountpoint

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
        httpx.get(url, timeout=REGISTRY_TIMEOUT)
    except httpx.HTTPError as exc:
        raise Unavailable(f"registry {registry} of Nydus image {image} cannot be reached: "
                          f"{exc or type(exc).__name__}") from None


def _bootstrap_layer(snapshot: Snapshot, parents: Sequence[Snapshot]) -> Snapshot | None:
    """The Nydus bootstrap layer a container's (unlabelled) snapshot sits on, if any."""
    if snapshot.labels.get(LABEL_TARGET):
        return None
    return next((p for p in parents if p.labels.get(LABEL_NYDUS_BOOTSTRAP) == "true"), None)
