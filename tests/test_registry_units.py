"""Offline parts of the registry client: references, digests, challenges, Docker config, manifests, layers."""

from __future__ import annotations

import base64
import gzip
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from lazyfs.errors import FormatError
from lazyfs.registry.auth import Credentials, load_docker_credentials, parse_challenges
from lazyfs.registry.digest import DigestVerifier, check_digest, sha256_digest
from lazyfs.registry.errors import (
    AuthError,
    InvalidReferenceError,
    NotFoundError,
    ProtocolError,
    RegistryDigestMismatch,
    RegistryError,
)
from lazyfs.registry.layers import LayerStream, layer_compression, open_layer_tar
from lazyfs.registry.manifest import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    build_index,
    build_manifest,
    parse_manifest,
)
from lazyfs.registry.reference import ImageReference, api_host
from tests.registry_fixtures import make_layer_tar

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
        ("user/app:v1.2_rc-3", "docker.io", "user/app", "v1.2_rc-3", None),
        ("localhost/a/b", "localhost", "a/b", "latest", None),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None),
        ("127.0.0.1:5000/x__y.z-w", "127.0.0.1:5000", "x__y.z-w", "latest", None),
        ("ghcr.io/org/img@" + DIGEST, "ghcr.io", "org/img", None, DIGEST),
        ("ghcr.io/org/img:tag@" + DIGEST, "ghcr.io", "org/img", "tag", DIGEST),
        ("[::1]:5000/img", "[::1]:5000", "img", "latest", None),
        ("Registry.Example/img", "Registry.Example", "img", "latest", None),
    ],
)
def test_reference_parse_and_round_trip(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = ImageReference.parse(text)
    assert ref == ImageReference(registry, repository, tag, digest)
    assert ImageReference.parse(str(ref)) == ref
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Ubuntu",
        "a//b",
        "a/b:",
        "a/b:bad tag",
        ":tag",
        "x@sha256:123",
        "x@md5:" + "0" * 32,
        "a/-b",
        "a/b/",
        "h:99999999/x",
    ],
)
def test_reference_rejects_bad_input(text: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid image reference") as info:
        ImageReference.parse(text)
    assert isinstance(info.value, ValueError)


def test_reference_helpers() -> None:
    assert api_host("docker.io") == "registry-1.docker.io"
    assert api_host("localhost:5000") == "localhost:5000"
    assert str(ImageReference.parse("a/b:t").with_digest(DIGEST)) == f"docker.io/a/b:t@{DIGEST}"


def test_digest_helpers() -> None:
    assert check_digest(DIGEST) == DIGEST
    for bad in ("sha256:" + "AB" * 32, "sha256:abc", "sha512:" + "ab" * 64, DIGEST + "\n"):
        with pytest.raises(InvalidReferenceError):
            check_digest(bad)
    verifier = DigestVerifier(sha256_digest(b"hello"), "blob x")
    verifier.update(b"hel")
    verifier.update(b"lo")
    verifier.verify()
    verifier.update(b"!")
    with pytest.raises(RegistryDigestMismatch, match="blob x"):
        verifier.verify()


def test_parse_challenges() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull", Basic realm="x \\"y\\""'
    )
    bearer, basic = parse_challenges([header])
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push repository:c:pull",
    }
    assert basic.scheme == "basic"
    assert basic.params == {"realm": 'x "y"'}
    [lone] = parse_challenges(["BASIC Realm=plain , error=x"])
    assert lone == type(lone)("basic", {"realm": "plain", "error": "x"})
    assert parse_challenges(["", '"garbage']) == []


def _write_config(tmp_path: Path, auths: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = base64.b64encode(b"alice:pa:ss").decode()
    _write_config(
        tmp_path,
        {
            "https://index.docker.io/v1/": {"auth": encoded},
            "http://localhost:5000": {"username": "bob", "password": "pw"},
            "registry.example/v2/": {"auth": ""},
        },
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert load_docker_credentials("docker.io") == Credentials("alice", "pa:ss")
    assert load_docker_credentials("localhost:5000") == Credentials("bob", "pw")
    assert load_docker_credentials("registry.example") is None
    assert load_docker_credentials("other.example") is None
    assert "pw" not in repr(Credentials("bob", "pw"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "missing"))
    assert load_docker_credentials("docker.io") is None


def test_docker_config_errors(tmp_path: Path) -> None:
    bad = _write_config(tmp_path, {"reg.example": {"auth": "not base64!"}})
    with pytest.raises(AuthError, match=r"reg\.example"):
        load_docker_credentials("reg.example", bad)
    bad.write_text("{")
    with pytest.raises(AuthError, match="cannot read Docker config"):
        load_docker_credentials("reg.example", bad)


def _descriptor(platform: str | None = None) -> Descriptor:
    return Descriptor(OCI_MANIFEST, DIGEST, 10, platform=Platform.parse(platform) if platform else None)


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_platform_selection(media_type: str) -> None:
    entries = [
        Descriptor(OCI_MANIFEST, "sha256:" + "01" * 32, 1, platform=Platform("linux", "amd64")),
        Descriptor(OCI_MANIFEST, "sha256:" + "02" * 32, 1, platform=Platform("linux", "arm", "v6")),
        Descriptor(OCI_MANIFEST, "sha256:" + "03" * 32, 1, platform=Platform("linux", "arm", "v7")),
        Descriptor(OCI_MANIFEST, "sha256:" + "04" * 32, 1, platform=Platform("linux", "arm64", "v8")),
        Descriptor(OCI_MANIFEST, "sha256:" + "05" * 32, 1, platform=Platform("unknown", "unknown")),
    ]
    index = parse_manifest(build_index(entries, media_type), "", "test")
    assert isinstance(index, ImageIndex)
    assert index.media_type == media_type
    assert index.manifests == tuple(entries)

    def pick(platform: str) -> str:
        return index.select(Platform.parse(platform), "test").digest

    assert pick("linux/amd64") == entries[0].digest
    assert pick("linux/amd64/v1") == entries[0].digest
    assert pick("linux/arm") == entries[2].digest
    assert pick("linux/arm/v6") == entries[1].digest
    assert pick("linux/arm64") == pick("linux/arm64/v8") == entries[3].digest
    with pytest.raises(NotFoundError, match=r"linux/s390x.*available: linux/amd64, linux/arm/v6"):
        pick("linux/s390x")
    with pytest.raises(InvalidReferenceError):
        Platform.parse("linux")


def test_manifest_round_trip_and_validation() -> None:
    config = Descriptor("application/vnd.oci.image.config.v1+json", DIGEST, 2)
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", DIGEST, 3, {"k": "v"})
    data = build_manifest(config, [layer], annotations={"a": "b"})
    manifest = parse_manifest(data, "application/json", "test")
    assert isinstance(manifest, ImageManifest)
    assert (manifest.config, manifest.layers, manifest.digest) == (config, (layer,), sha256_digest(data))
    assert manifest.descriptor == Descriptor(OCI_MANIFEST, sha256_digest(data), len(data))
    # Without a mediaType field, the Content-Type decides.
    bare = json.dumps({"schemaVersion": 2, "config": config.to_json(), "layers": []}).encode()
    assert parse_manifest(bare, OCI_MANIFEST + "; charset=utf-8", "t").media_type == OCI_MANIFEST
    bad_docs: list[object] = [
        [],
        {"schemaVersion": 1},
        {"schemaVersion": 2, "mediaType": "application/x-other"},
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []},
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.to_json(), "layers": {}},
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**_descriptor().to_json(), "size": -1}]},
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**_descriptor().to_json(), "digest": "x"}]},
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**_descriptor().to_json(), "platform": 1}]},
    ]
    for doc in bad_docs:
        with pytest.raises(ProtocolError, match="manifest m"):
            parse_manifest(json.dumps(doc).encode(), "", "manifest m")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_manifest(b"\xff", "", "manifest m")


def _tar_members(stream: LayerStream) -> dict[str, bytes]:
    members = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            assert extracted is not None
            members[member.name] = extracted.read()
    return members


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", lambda d: gzip.compress(d)),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", lambda d: gzip.compress(d)),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", lambda d: gzip.compress(d)),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            # Two frames, as produced by chunked zstd converters.
            lambda d: zstandard.ZstdCompressor().compress(d[:2048]) + zstandard.ZstdCompressor().compress(d[2048:]),
        ),
        ("application/vnd.oci.image.layer.v1.tar", lambda d: d),
    ],
)
def test_open_layer_tar(tmp_path: Path, media_type: str, compress: Callable[[bytes], bytes]) -> None:
    files = {"etc/hostname": b"lazyfs\n", "usr/bin/big": bytes(range(256)) * 400}
    path = tmp_path / "layer"
    path.write_bytes(compress(make_layer_tar(files)))
    assert layer_compression(media_type) in ("gzip", "zstd", "none")
    with open_layer_tar(path, media_type) as stream:
        assert _tar_members(stream) == files


def test_open_layer_tar_rejects_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_bytes(make_layer_tar({"a": b"b"}))
    with pytest.raises(FormatError, match="not gzip-compressed"):
        open_layer_tar(path, "application/vnd.oci.image.layer.v1.tar+gzip")
    with pytest.raises(FormatError, match="not zstd-compressed"):
        open_layer_tar(path, "application/vnd.oci.image.layer.v1.tar+zstd")
    with pytest.raises(FormatError, match="unsupported layer media type"):
        open_layer_tar(path, "application/vnd.oci.image.config.v1+json")


def test_error_hierarchy() -> None:
    assert issubclass(RegistryDigestMismatch, RegistryError)
    assert issubclass(RegistryDigestMismatch, FormatError)
