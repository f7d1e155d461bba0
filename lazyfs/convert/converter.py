"""``lazyfs convert``: pull an OCI/Docker image, build one Nydus blob per layer, merge, push.

Each layer is downloaded to a temporary file (digest-verified), then streamed through the
decompressor and tar reader into a data blob in a worker thread, so memory stays bounded whatever
the layer size. The merged bootstrap goes into the last layer, as nydus-snapshotter expects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyfs.convert.nydus_image import (
    MAX_CONFIG_SIZE,
    blob_descriptor,
    is_nydus_manifest,
    make_bootstrap_layer,
    nydus_config,
)
from lazyfs.errors import FormatError
from lazyfs.progress import Progress, human
from lazyfs.rafs.builder import BuildOptions, BuildResult, build_from_tar_stream
from lazyfs.rafs.merge import merge_trees
from lazyfs.rafs.writer import write_bootstrap
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.layers import open_layer_tar
from lazyfs.registry.manifest import OCI_CONFIG, OCI_MANIFEST, Descriptor, ImageManifest, build_manifest
from lazyfs.registry.reference import ImageReference


@dataclass(frozen=True)
class ConvertResult:
    """The pushed Nydus image."""

    reference: str
    manifest_digest: str
    layers: tuple[Descriptor, ...]
    bootstrap_size: int


async def read_small_blob(client: RegistryClient, repo: str, desc: Descriptor, cap: int = MAX_CONFIG_SIZE) -> bytes:
    """A small blob (an image config) in memory, size-capped and digest-checked."""
    if desc.size > cap:
        raise FormatError(f"blob {desc.digest} is {desc.size} bytes, more than the {cap}-byte limit")
    data = bytearray()
    async with client.get_blob_stream(repo, desc.digest) as stream:
        async for chunk in stream:
            data += chunk
            if len(data) > cap:
                raise FormatError(f"blob {desc.digest} exceeds the {cap}-byte limit")
    if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise FormatError(f"blob {desc.digest} does not match its digest")
    return bytes(data)


async def _build_layer(src: RegistryClient, repo: str, layer: Descriptor, work: Path, options: BuildOptions,
                       progress: Progress) -> BuildResult:
    path = work / layer.digest.replace(":", "-")
    progress.start(f"pull {layer.digest[7:19]}", layer.size)
    await src.fetch_blob_to_file(repo, layer.digest, path, progress.update, size=layer.size)
    progress.done(f"{human(layer.size)} downloaded")

    def build() -> BuildResult:
        with open_layer_tar(path, layer.media_type) as stream:
            return build_from_tar_stream(stream, work / "blobs", options)

    progress.start(f"build {layer.digest[7:19]}")
    result = await trio.to_thread.run_sync(build)
    path.unlink()
    chunks = result.blob.chunk_count if result.blob else 0
    progress.done(f"{chunks} chunks, {human(result.blob.compressed_size) if result.blob else 'no data'}")
    return result


async def convert_image(src: RegistryClient, dst: RegistryClient, source: str, target: str, *,
                        platform: str = "linux/amd64", options: BuildOptions | None = None,
                        progress: Progress | None = None, work_dir: str | None = None) -> ConvertResult:
    """Convert image *source* (read with *src*) into a Nydus image pushed as *target* with *dst*.

    The paths in ``options.prefetch`` go into the merged bootstrap's prefetch table (BuildError if one is
    not in the image).
    """
    progress = progress or Progress(enabled=False)
    src_ref, dst_ref = ImageReference.parse(source), ImageReference.parse(target)
    manifest: ImageManifest = await src.get_manifest(src_ref, platform)
    if is_nydus_manifest(manifest.layers):
        raise FormatError(f"{source} is already a Nydus image")
    config = await read_small_blob(src, src_ref.repository, manifest.config)
    options = options or BuildOptions()
    layer_options = dataclasses.replace(options, prefetch=())  # a listed path may be in any layer
    with tempfile.TemporaryDirectory(prefix="lazyfs-convert-", dir=work_dir) as tmp:
        work = Path(tmp)
        results = [
            await _build_layer(src, src_ref.repository, layer, work, layer_options, progress)
            for layer in manifest.layers
        ]
        merged = merge_trees([r.tree for r in results])
        merged.prefetch = list(options.prefetch)
        bootstrap = write_bootstrap(merged)
        layers: list[Descriptor] = []
        for blob in merged.blobs:
            blob_path = work / "blobs" / blob.blob_id
            progress.start(f"push {blob.blob_id[:12]}", blob.compressed_size)
            await dst.push_blob(dst_ref.repository, blob_path, "sha256:" + blob.blob_id)
            progress.done(f"{human(blob.compressed_size)} pushed")
            layers.append(blob_descriptor(blob.blob_id, blob_path.stat().st_size))
    boot_layer = make_bootstrap_layer(bootstrap)
    await dst.push_blob(dst_ref.repository, boot_layer.data, boot_layer.descriptor.digest)
    layers.append(boot_layer.descriptor)
    config_blob = nydus_config(config, [b.blob_id for b in merged.blobs], boot_layer)
    config_desc = Descriptor(OCI_CONFIG, "sha256:" + hashlib.sha256(config_blob).hexdigest(), len(config_blob))
    await dst.push_blob(dst_ref.repository, config_blob, config_desc.digest)
    manifest_blob = build_manifest(config_desc, layers, OCI_MANIFEST)
    digest = await dst.put_manifest(dst_ref, manifest_blob, OCI_MANIFEST)
    progress.start("manifest")
    progress.done(f"{target} -> {digest} ({len(layers) - 1} blobs, bootstrap {human(len(bootstrap))})")
    return ConvertResult(str(dst_ref), digest, tuple(layers), len(bootstrap))
