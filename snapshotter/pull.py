"""``lazyfs image pull``: pull an image into containerd and unpack it through a (remote) snapshotter.

What ``ctr-remote image rpull`` does, and what containerd's client-side unpacker does for CRI: the image is
resolved in its registry; config, manifest (and index) go to containerd's content store, labelled so that
garbage collection follows them. Each layer is prepared in the snapshotter under ``extract-<random>
<chainID>`` with the labels remote snapshotters read (``containerd.io/snapshot.ref`` = chain ID, the
``cri.*`` image information and the layer's own ``containerd.io/snapshot/`` annotations). A layer the
snapshotter answers ALREADY_EXISTS for is remote: it is never downloaded. Any other layer is downloaded into
the content store and extracted by containerd's diff service, then committed as its chain ID. The config
finally references the top snapshot and the image record points at the pulled content, so ``ctr run
--snapshotter NAME`` does not unpack again. A lease protects everything until then.

This is where the two I/O worlds meet: registry calls run in trio, containerd calls (synchronous grpcio) in
trio worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import trio

from lazyfs.convert.converter import read_small_blob
from lazyfs.convert.nydus_image import NYDUS_BLOB_MEDIA_TYPE
from lazyfs.errors import FormatError, LazyfsError
from lazyfs.progress import Progress, human
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.digest import check_digest
from lazyfs.registry.errors import ProtocolError, RegistryError
from lazyfs.registry.manifest import Descriptor, ImageIndex, ImageManifest, Platform
from lazyfs.registry.reference import ImageReference
from snapshotter.containerd_client import Containerd, ContainerdError, ContentWriter, Mounts

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
MAX_LABEL_SIZE = 4096  # containerd's limit on one label's key plus value
WRITE_SIZE = 1 << 20  # bytes per Content.Write message

T = TypeVar("T")
Outcome = Literal["present", "remote", "unpacked"]  # a layer's: already unpacked, answered ALREADY_EXISTS, extracted


class PullError(LazyfsError):
    """The image cannot be pulled as asked."""


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """An image as its registry describes it."""

    target: Descriptor  # what the name points at: the index, or the manifest if there is none
    index: ImageIndex | None
    manifest: ImageManifest
    config: bytes
    diff_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PullResult:
    """What a pull did: layer counts by outcome."""

    name: str
    manifest_digest: str
    chain_id: str
    outcomes: collections.Counter[Outcome]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every layer: the first diff ID, then sha256 of "<parent chain ID> <diff ID>"."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest() if chain else diff_id)
    return chain


def snapshot_labels(name: str, manifest: ImageManifest, index: int, chain_id: str) -> dict[str, str]:
    """The labels layer *index* is prepared with: its ``containerd.io/snapshot/`` annotations, the target
    chain ID, and the image information CRI adds (``cri.image-layers``: this layer and those above it, as
    many as fit in one label)."""
    layer = manifest.layers[index]
    labels = {key: value for key, value in layer.annotations.items() if key.startswith(INHERITED_PREFIX)}
    labels |= {
        LABEL_SNAPSHOT_REF: chain_id,
        LABEL_IMAGE_REF: name,
        LABEL_MANIFEST_DIGEST: manifest.digest,
        LABEL_LAYER_DIGEST: layer.digest,
        LABEL_IMAGE_LAYERS: _layer_list(manifest.layers[index:]),
    }
    return labels


def _layer_list(layers: Sequence[Descriptor]) -> str:
    """Comma-separated layer digests, cut before the label would exceed MAX_LABEL_SIZE."""
    text = ""
    for layer in layers:
        item = f",{layer.digest}" if text else layer.digest
        if len(LABEL_IMAGE_LAYERS) + len(text) + len(item) > MAX_LABEL_SIZE:
            break
        text += item
    return text


def content_labels(image: ResolvedImage) -> dict[str, str]:
    """The manifest's GC labels: it references its config and layers."""
    manifest = image.manifest
    layers = {f"containerd.io/gc.ref.content.l.{i}": layer.digest for i, layer in enumerate(manifest.layers)}
    return {"containerd.io/gc.ref.content.config": manifest.config.digest, **layers}


async def resolve(registry: RegistryClient, ref: ImageReference, platform: str) -> ResolvedImage:
    """Fetch the manifest for *platform* (and the index naming it, if any) and the config of image *ref*."""
    top = await registry.fetch_manifest(ref)
    if isinstance(top, ImageIndex):
        chosen = top.select(Platform.parse(platform), f"index {ref}")
        manifest = await registry.get_manifest(ref.with_digest(chosen.digest), platform)
        target = Descriptor(top.media_type, top.digest, len(top.data))
    else:
        manifest, target = top, top.descriptor
    config = await read_small_blob(registry, ref.repository, manifest.config)
    index = top if isinstance(top, ImageIndex) else None
    return ResolvedImage(target, index, manifest, config, _diff_ids(config, len(manifest.layers), str(ref)))


def _diff_ids(config: bytes, layer_count: int, what: str) -> tuple[str, ...]:
    """``rootfs.diff_ids`` of an image config, one per layer."""
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise TypeError("not a list of strings")
        checked = tuple(check_digest(d) for d in diff_ids)
    except (ValueError, KeyError, TypeError, RegistryError) as exc:
        raise FormatError(f"{what}: image config has no valid rootfs.diff_ids: {exc}") from None
    if len(checked) != layer_count:
        raise FormatError(f"{what}: config lists {len(checked)} diff IDs for {layer_count} layers")
    return checked


def store_metadata(containerd: Containerd, image: ResolvedImage) -> None:
    """Write config, manifest and index to the content store, each labelled with references to its children."""
    manifest = image.manifest
    containerd.write_blob(f"config-{manifest.config.digest}", manifest.config, image.config, {})
    containerd.write_blob(f"manifest-{manifest.digest}", manifest.descriptor, manifest.data, content_labels(image))
    if image.index is not None:
        labels = {"containerd.io/gc.ref.content.m.0": manifest.digest}
        containerd.write_blob(f"index-{image.index.digest}", image.target, image.index.data, labels)


async def _sync(fn: Callable[..., T], *args: object) -> T:
    """Run containerd call *fn* in a worker thread."""
    return await trio.to_thread.run_sync(fn, *args)


async def _cleanup(fn: Callable[..., object], *args: object) -> None:
    """Undo step *fn* while an error propagates: shielded from cancellation, its own failure not masking it."""
    with trio.CancelScope(shield=True), contextlib.suppress(ContainerdError):
        await _sync(fn, *args)


@dataclasses.dataclass
class _Pull:
    """One pull of *image* as *name* into *snapshotter*."""

    registry: RegistryClient
    containerd: Containerd
    repository: str
    name: str
    snapshotter: str
    image: ResolvedImage
    progress: Progress

    async def run(self) -> PullResult:
        layers = self.image.manifest.layers
        self._say(f"{self.name}: manifest {self.image.manifest.digest}, {len(layers)} layer(s), "
                  f"{human(sum(layer.size for layer in layers))}")
        await _sync(self.containerd.create_lease)
        try:
            result = await self._pull()
        except BaseException:
            await _cleanup(self.containerd.delete_lease)
            raise
        await _sync(self.containerd.delete_lease)
        return result

    async def _pull(self) -> PullResult:
        await _sync(store_metadata, self.containerd, self.image)
        chain = chain_ids(self.image.diff_ids)
        outcomes: collections.Counter[Outcome] = collections.Counter()
        for i, chain_id in enumerate(chain):
            outcomes[await self._unpack(i, chain[i - 1] if i else "", chain_id)] += 1
        top = chain[-1] if chain else ""
        if top:
            labels = {f"containerd.io/gc.ref.snapshot.{self.snapshotter}": top}
            await _sync(self.containerd.update_content_labels, self.image.manifest.config.digest, labels)
        await _sync(self.containerd.put_image, self.name, self.image.target)
        return PullResult(self.name, self.image.manifest.digest, top, outcomes)

    async def _unpack(self, index: int, parent: str, chain_id: str) -> Outcome:
        """Unpack layer *index* as snapshot *chain_id* on top of *parent*."""
        layer = self.image.manifest.layers[index]
        label = f"layer {layer.digest[:19]}"
        if await _sync(self.containerd.snapshot_exists, self.snapshotter, chain_id):
            self._say(f"{label}: already unpacked")
            return "present"
        labels = snapshot_labels(self.name, self.image.manifest, index, chain_id)
        key = f"extract-{secrets.token_hex(8)} {chain_id}"
        mounts = await _sync(self.containerd.prepare_snapshot, self.snapshotter, key, parent, labels)
        if mounts is None:
            if not await _sync(self.containerd.snapshot_exists, self.snapshotter, chain_id):
                raise PullError(f"{label}: snapshotter {self.snapshotter} answered ALREADY_EXISTS to {key!r} "
                                f"but has no snapshot {chain_id}")
            self._say(f"{label}: remote (lazy)")
            return "remote"
        try:
            await self._extract(layer, label, self.image.diff_ids[index], mounts)
            committed = await _sync(self.containerd.commit_snapshot, self.snapshotter, chain_id, key, labels)
        except BaseException:
            await _cleanup(self.containerd.remove_snapshot, self.snapshotter, key)
            raise
        if not committed:  # unpacked concurrently by someone else
            await _sync(self.containerd.remove_snapshot, self.snapshotter, key)
        return "unpacked"

    async def _extract(self, layer: Descriptor, label: str, diff_id: str, mounts: Mounts) -> None:
        """Download *layer* into the content store and have containerd extract it into *mounts*."""
        if layer.media_type == NYDUS_BLOB_MEDIA_TYPE:
            raise PullError(f"{label} is a Nydus data blob, which snapshotter {self.snapshotter} does not serve "
                            "lazily, and containerd cannot extract it: pull with the lazyfs snapshotter")
        self.progress.start(label, layer.size)
        downloaded = await self._download(layer)
        applied = await _sync(self.containerd.apply_layer, layer, mounts)
        if applied != diff_id:
            raise PullError(f"{label}: extracted content has digest {applied}, the image config says {diff_id}")
        self.progress.done(f"unpacked ({human(downloaded)} downloaded)" if downloaded
                           else "unpacked (blob was in the content store)")

    async def _download(self, layer: Descriptor) -> int:
        """Stream blob *layer* from the registry into the content store; the bytes downloaded."""
        writer = await _sync(self.containerd.open_writer, f"layer-{layer.digest}", layer)
        if writer is None:
            return 0
        try:
            buffer = bytearray()
            async with self.registry.get_blob_stream(self.repository, layer.digest) as stream:
                async for chunk in stream:
                    buffer += chunk
                    if len(buffer) >= WRITE_SIZE:
                        await self._flush(writer, layer, buffer)
            await self._flush(writer, layer, buffer)
            await _sync(writer.commit, {})
        except BaseException:
            await _cleanup(writer.abort)
            raise
        return writer.offset

    async def _flush(self, writer: ContentWriter, layer: Descriptor, buffer: bytearray) -> None:
        if writer.offset + len(buffer) > layer.size:
            raise ProtocolError(f"blob {layer.digest}: registry sent more than its {layer.size} bytes")
        await _sync(writer.write, bytes(buffer))
        buffer.clear()
        self.progress.update(writer.offset)

    def _say(self, line: str) -> None:
        if self.progress.enabled:
            self.progress.stream.write(line + "\n")
            self.progress.stream.flush()


async def pull_image(registry: RegistryClient, containerd: Containerd, ref: ImageReference, *,
                     snapshotter: str = "lazyfs", platform: str = "linux/amd64",
                     progress: Progress | None = None) -> PullResult:
    """Pull image *ref* (from *registry*) into *containerd* and unpack it through *snapshotter*."""
    progress = progress or Progress(enabled=False)
    image = await resolve(registry, ref, platform)
    return await _Pull(registry, containerd, ref.repository, str(ref), snapshotter, image, progress).run()
