"""Image manifests and indexes (OCI and Docker schema 2): parsing, platform selection, building."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lazyfs.registry.digest import check_digest, sha256_digest
from lazyfs.registry.errors import InvalidReferenceError, NotFoundError, ProtocolError, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Default variants, so that e.g. "linux/arm64" and "linux/arm64/v8" name the same platform.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


@dataclasses.dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` triple as found in image indexes."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidReferenceError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(*parts)

    def normalized_variant(self) -> str:
        """The variant, or the architecture's default variant when none is given."""
        return self.variant or _DEFAULT_VARIANT.get(self.architecture, "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A content descriptor: media type, digest and size, plus annotations and (in indexes) platform."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: object, what: str) -> Descriptor:
        """Validate and convert one descriptor object of a manifest or index."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what}: descriptor is not an object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        annotations = obj.get("annotations") or {}
        if (
            not isinstance(media_type, str)
            or not isinstance(digest, str)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or not isinstance(annotations, dict)
            or not all(isinstance(v, str) for v in annotations.values())
        ):
            raise ProtocolError(f"{what}: malformed descriptor {json.dumps(obj)[:200]}")
        try:
            check_digest(digest)
        except RegistryError as exc:
            raise ProtocolError(f"{what}: {exc}") from None
        return cls(media_type, digest, size, annotations, _platform_from_json(obj.get("platform"), what))

    def to_json(self) -> dict[str, Any]:
        """The OCI JSON form of this descriptor."""
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.platform:
            obj["platform"] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                obj["platform"]["variant"] = self.platform.variant
        return obj


def _platform_from_json(obj: object, what: str) -> Platform | None:
    """The platform of an index entry, if it has a well-formed one."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: platform is not an object")
    os_name, arch, variant = obj.get("os"), obj.get("architecture"), obj.get("variant") or ""
    if not (isinstance(os_name, str) and isinstance(arch, str) and isinstance(variant, str)):
        raise ProtocolError(f"{what}: malformed platform {json.dumps(obj)[:200]}")
    return Platform(os_name, arch, variant)


@dataclasses.dataclass(frozen=True)
class ImageManifest:
    """A single-platform image manifest and the exact bytes it was read from."""

    media_type: str
    digest: str
    data: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def descriptor(self) -> Descriptor:
        """A descriptor pointing at this manifest."""
        return Descriptor(self.media_type, self.digest, len(self.data))


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """A multi-platform index (OCI image index or Docker manifest list)."""

    media_type: str
    digest: str
    data: bytes
    manifests: tuple[Descriptor, ...]

    def select(self, wanted: Platform, what: str) -> Descriptor:
        """The manifest for *wanted*; without a variant, prefer the architecture's default one."""
        candidates = [
            d
            for d in self.manifests
            if d.media_type in MANIFEST_TYPES
            and d.platform is not None
            and (d.platform.os, d.platform.architecture) == (wanted.os, wanted.architecture)
        ]
        best = [d for d in candidates if d.platform and d.platform.normalized_variant() == wanted.normalized_variant()]
        if best:
            return best[0]
        if candidates and not wanted.variant:
            return candidates[0]
        available = ", ".join(sorted({str(d.platform) for d in self.manifests if d.platform})) or "none"
        raise NotFoundError(f"{what}: no manifest for platform {wanted} (available: {available})")


def parse_manifest(data: bytes, content_type: str, what: str) -> ImageManifest | ImageIndex:
    """Parse a manifest or index, taking its type from ``mediaType`` or else the Content-Type."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ProtocolError(f"{what}: not a schema version 2 manifest")
    media_type = doc.get("mediaType") or content_type.split(";")[0].strip()
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ProtocolError(f"{what}: index has no manifests list")
        descriptors = tuple(Descriptor.from_json(e, what) for e in entries)
        return ImageIndex(media_type or OCI_INDEX, sha256_digest(data), data, descriptors)
    if media_type in MANIFEST_TYPES or (not media_type and "config" in doc):
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ProtocolError(f"{what}: manifest has no layers list")
        config = Descriptor.from_json(doc.get("config"), what)
        descriptors = tuple(Descriptor.from_json(layer, what) for layer in layers)
        return ImageManifest(media_type or OCI_MANIFEST, sha256_digest(data), data, config, descriptors)
    raise ProtocolError(f"{what}: unsupported manifest media type {str(media_type)[:100]!r}")


def build_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    media_type: str = OCI_MANIFEST,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise an image manifest (OCI or Docker schema 2, by *media_type*)."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()


def build_index(manifests: Sequence[Descriptor], media_type: str = OCI_INDEX) -> bytes:
    """Serialise an image index or Docker manifest list; entries should carry their platform."""
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [m.to_json() for m in manifests]}
    return json.dumps(doc, separators=(",", ":")).encode()
