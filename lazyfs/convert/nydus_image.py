"""How a Nydus image is packaged as an OCI image: media types, annotations, bootstrap layer, config.

Matches what nydus-snapshotter's converter produces (../shared/docs/nydus-format.md §3), so the
images work with nydus-snapshotter, nydusd and lazyfs alike.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

from lazyfs.errors import FormatError
from lazyfs.registry.manifest import OCI_LAYER_GZIP, Descriptor

NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
LABEL_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
LABEL_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
LABEL_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
BOOTSTRAP_PATH = "image/image.boot"
MAX_CONFIG_SIZE = 8 << 20


@dataclass(frozen=True)
class BootstrapLayer:
    """The gzip'ed tar holding ``image/image.boot``, as pushed to the registry."""

    data: bytes
    diff_id: str  # sha256 of the uncompressed tar

    @property
    def descriptor(self) -> Descriptor:
        """Its manifest entry, annotated as the Nydus bootstrap."""
        return Descriptor(
            OCI_LAYER_GZIP, "sha256:" + hashlib.sha256(self.data).hexdigest(), len(self.data),
            {LABEL_NYDUS_BOOTSTRAP: "true", LABEL_NYDUS_FS_VERSION: "6"},
        )


def blob_descriptor(blob_id: str, size: int) -> Descriptor:
    """The manifest entry of a Nydus data blob (its digest is its blob id)."""
    return Descriptor(NYDUS_BLOB_MEDIA_TYPE, "sha256:" + blob_id, size, {LABEL_NYDUS_BLOB: "true"})


def is_nydus_manifest(layers: tuple[Descriptor, ...]) -> bool:
    """Whether a manifest's last layer is a Nydus bootstrap layer."""
    return bool(layers) and layers[-1].annotations.get(LABEL_NYDUS_BOOTSTRAP) == "true"


def make_bootstrap_layer(bootstrap: bytes) -> BootstrapLayer:
    """A reproducible tar.gz with the directory ``image/`` and the file ``image/image.boot``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("image")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        boot = tarfile.TarInfo(BOOTSTRAP_PATH)
        boot.size, boot.mode = len(bootstrap), 0o644
        tar.addfile(boot, io.BytesIO(bootstrap))
    data = raw.getvalue()
    return BootstrapLayer(gzip.compress(data, mtime=0), "sha256:" + hashlib.sha256(data).hexdigest())


def nydus_config(source_config: bytes, blob_ids: list[str], bootstrap: BootstrapLayer) -> bytes:
    """The image config with ``rootfs.diff_ids`` and history rewritten for the Nydus layers."""
    try:
        config: dict[str, Any] = json.loads(source_config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"source image config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FormatError("source image config is not a JSON object")
    config["rootfs"] = {"type": "layers", "diff_ids": [*("sha256:" + b for b in blob_ids), bootstrap.diff_id]}
    config["history"] = [
        *({"created_by": "lazyfs convert: Nydus data blob", "comment": "nydus-blob"} for _ in blob_ids),
        {"created_by": "lazyfs convert", "comment": "Nydus Bootstrap Layer"},
    ]
    return json.dumps(config, separators=(",", ":")).encode()
