"""Reading Nydus images straight from a registry: their bootstrap and, when needed, their blobs."""

from __future__ import annotations

from pathlib import Path

from lazyfs.convert.converter import read_small_blob
from lazyfs.convert.nydus_image import LABEL_NYDUS_BLOB, is_nydus_manifest
from lazyfs.errors import FormatError
from lazyfs.progress import Progress, human
from lazyfs.rafs.blob import MAX_BOOTSTRAP
from lazyfs.rafs.loader import bootstrap_from_layer
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.manifest import ImageManifest
from lazyfs.registry.reference import ImageReference


async def fetch_nydus_manifest(client: RegistryClient, ref: str, platform: str) -> ImageManifest:
    """The manifest of a Nydus image; FormatError when *ref* is an ordinary image."""
    manifest = await client.get_manifest(ImageReference.parse(ref), platform)
    if not is_nydus_manifest(manifest.layers):
        raise FormatError(f"{ref} is not a Nydus image (no nydus-bootstrap layer); convert it first")
    return manifest


async def fetch_bootstrap(client: RegistryClient, ref: str, manifest: ImageManifest) -> bytes:
    """The merged bootstrap from the image's last layer."""
    repo = ImageReference.parse(ref).repository
    layer = await read_small_blob(client, repo, manifest.layers[-1], cap=MAX_BOOTSTRAP)
    return bootstrap_from_layer(layer)


async def fetch_blobs(client: RegistryClient, ref: str, manifest: ImageManifest, blob_dir: Path,
                      progress: Progress) -> None:
    """Download every Nydus data blob of the image into *blob_dir*, named by blob id."""
    repo = ImageReference.parse(ref).repository
    blob_dir.mkdir(parents=True, exist_ok=True)
    for layer in manifest.layers:
        if layer.annotations.get(LABEL_NYDUS_BLOB) != "true":
            continue
        target = blob_dir / layer.digest.removeprefix("sha256:")
        if target.exists():
            continue
        progress.start(f"pull {layer.digest[7:19]}", layer.size)
        await client.fetch_blob_to_file(repo, layer.digest, target, progress.update, size=layer.size)
        progress.done(f"{human(layer.size)} downloaded")
