"""RegistryClient against a real docker-registry: blobs, ranges, manifests, mounts, errors."""

from __future__ import annotations

import http.server
import json
from pathlib import Path

import pytest

from lazyfs.registry.client import MAX_MANIFEST_SIZE, RegistryClient
from lazyfs.registry.digest import sha256_digest
from lazyfs.registry.errors import NotFoundError, ProtocolError, RegistryDigestMismatch
from lazyfs.registry.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    build_index,
    build_manifest,
)
from tests.registry_fixtures import (
    FAST_RETRY,
    RegistryServer,
    Response,
    local_http_server,
    make_layer_tar,
    push_test_image,
    scripted_handler,
)

MiB = 1 << 20


def _data(size: int, seed: int = 0) -> bytes:
    """Reproducible test data of *size* bytes."""
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    return block * (size // 4096) + block[: size % 4096]


async def test_ping(registry: RegistryServer) -> None:
    async with registry.client() as client:
        await client.ping()


@pytest.mark.parametrize("source", ["bytes", "file"])
@pytest.mark.parametrize(("size", "chunked"), [(1536 * 1024, False), (3 * MiB + 123, True)])
async def test_push_and_pull_blob(
    registry: RegistryServer, tmp_path: Path, source: str, size: int, chunked: bool
) -> None:
    data = _data(size, seed=size % 13)
    digest = sha256_digest(data)
    upload: bytes | Path = data
    if source == "file":
        upload = tmp_path / "upload"
        upload.write_bytes(data)
    async with registry.client(chunk_size=512 * 1024, chunked_threshold=2 * MiB) as client:
        assert not await client.blob_exists("test/blobs", digest)
        assert await client.push_blob("test/blobs", upload) == digest
        assert await client.blob_exists("test/blobs", digest)
        seen: list[int] = []
        target = tmp_path / "out" / "blob"
        target.parent.mkdir()
        assert await client.fetch_blob_to_file("test/blobs", digest, target, seen.append, size=size) == size
    assert target.read_bytes() == data
    assert seen[-1] == size and seen == sorted(seen)
    assert not (tmp_path / "out" / "blob.part").exists()
    patches = [e for e in registry.access_log() if e.method == "PATCH"]
    assert len(patches) == (7 if chunked else 0)
    assert registry.bytes_served(digest) == size


async def test_push_existing_blob_skips_upload(registry: RegistryServer) -> None:
    async with registry.client() as client:
        digest = await client.push_blob("test/dup", b"same")
        assert await client.push_blob("test/dup", b"same", digest) == digest
    posts = [e for e in registry.access_log() if e.method == "POST"]
    assert len(posts) == 1


async def test_range_reads(registry: RegistryServer) -> None:
    data = _data(2 * MiB + 5)
    async with registry.client() as client:
        digest = await client.push_blob("test/range", data)

        async def read(offset: int, length: int | None) -> bytes:
            async with client.get_blob_stream("test/range", digest, offset=offset, length=length) as stream:
                got = b"".join([chunk async for chunk in stream])
                assert stream.length == len(got)
                return got

        assert await read(0, 10) == data[:10]
        assert await read(MiB - 3, 100_000) == data[MiB - 3 : MiB - 3 + 100_000]
        assert await read(2 * MiB, None) == data[2 * MiB :]
        assert await read(len(data) - 1, 50) == data[-1:]
        async with client.get_blob_stream("test/range", digest) as stream:
            assert stream.length == len(data)
        with pytest.raises(ProtocolError, match="416"):
            await read(len(data) + 10, 5)
        with pytest.raises(ValueError, match="invalid range"):
            await read(-1, 5)
    # Each ranged read moved only the bytes asked for.
    ranged = [e.size for e in registry.access_log() if e.status == 206]
    assert ranged == [10, 100_000, 5, 1]


@pytest.mark.parametrize(("media_type", "compression"), [(OCI_MANIFEST, "zstd"), (DOCKER_MANIFEST, "gzip")])
async def test_manifest_round_trip(registry: RegistryServer, media_type: str, compression: str) -> None:
    layers = [make_layer_tar({"a": b"1"}), make_layer_tar({"b/c": b"2" * 5000})]
    async with registry.client() as client:
        pushed = await push_test_image(client, "test/img", "v1", layers, compression=compression, media_type=media_type)
        manifest = await client.get_manifest(f"{registry.host}/test/img:v1")
        by_digest = await client.get_manifest(f"{registry.host}/test/img@{pushed.manifest.digest}")
    assert manifest == by_digest
    assert manifest.media_type == media_type
    assert manifest.digest == pushed.manifest.digest
    assert manifest.config == pushed.config
    assert manifest.config.media_type == (DOCKER_CONFIG if media_type == DOCKER_MANIFEST else pushed.config.media_type)
    assert list(manifest.layers) == pushed.layers
    assert manifest.layers[0].media_type == (DOCKER_LAYER_GZIP if media_type == DOCKER_MANIFEST else OCI_LAYER_ZSTD)
    assert json.loads(manifest.data)["mediaType"] == media_type


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
async def test_index_platform_selection(registry: RegistryServer, index_type: str) -> None:
    media_type = OCI_MANIFEST if index_type == OCI_INDEX else DOCKER_MANIFEST
    async with registry.client() as client:
        amd64 = await push_test_image(
            client, "test/multi", None, [make_layer_tar({"arch": b"amd64"})], media_type=media_type
        )
        arm64 = await push_test_image(
            client,
            "test/multi",
            None,
            [make_layer_tar({"arch": b"arm64"})],
            media_type=media_type,
            platform="linux/arm64/v8",
        )
        index = build_index([amd64.manifest, arm64.manifest], index_type)
        ref = f"{registry.host}/test/multi:latest"
        await client.put_manifest(ref, index, index_type)
        fetched = await client.fetch_manifest(ref)
        assert isinstance(fetched, ImageIndex) and fetched.media_type == index_type
        assert fetched.digest == sha256_digest(index)
        for platform, expected in [("linux/amd64", amd64), ("linux/arm64", arm64), ("linux/arm64/v8", arm64)]:
            manifest = await client.get_manifest(ref, platform)
            assert manifest.digest == expected.manifest.digest
            assert list(manifest.layers) == expected.layers
        with pytest.raises(NotFoundError, match=r"linux/ppc64le.*linux/amd64, linux/arm64/v8"):
            await client.get_manifest(ref, "linux/ppc64le")


async def test_cross_repo_mount(registry: RegistryServer) -> None:
    data = _data(MiB + 1)
    async with registry.client() as client:
        digest = await client.push_blob("team/base", data)
        assert await client.push_blob("team/app", data, digest, mount_from="team/base") == digest
        assert await client.blob_exists("team/app", digest)
        # A mount from a repository without the blob falls back to uploading it.
        assert await client.push_blob("team/other", data, mount_from="team/empty") == digest
        assert await client.blob_exists("team/other", digest)
    posts = [(e.path, e.status) for e in registry.access_log() if e.method == "POST"]
    assert [status for _, status in posts] == [202, 201, 202]
    assert "mount=" in posts[1][0] and "from=team/base" in posts[1][0]
    puts = [e for e in registry.access_log() if e.method == "PUT"]
    assert len(puts) == 2


async def test_not_found(registry: RegistryServer, tmp_path: Path) -> None:
    tmp_path = tmp_path / "downloads"
    tmp_path.mkdir()
    missing = sha256_digest(b"missing")
    async with registry.client() as client:
        with pytest.raises(NotFoundError, match=rf"manifest {registry.host}/test/none:latest: GET .*404"):
            await client.get_manifest(f"{registry.host}/test/none")
        with pytest.raises(NotFoundError, match=rf"blob {missing} in test/none.*404.*BLOB_UNKNOWN"):
            await client.fetch_blob_to_file("test/none", missing, tmp_path / "blob")
        with pytest.raises(NotFoundError, match="404"):
            async with client.get_blob_stream("test/none", missing, offset=3):
                pass
    assert list(tmp_path.iterdir()) == []


async def test_corrupt_blob_is_detected(registry: RegistryServer, tmp_path: Path) -> None:
    tmp_path = tmp_path / "downloads"
    tmp_path.mkdir()
    data = _data(MiB)
    async with registry.client() as client:
        digest = await client.push_blob("test/corrupt", data)
        stored = registry.root / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
        stored.write_bytes(b"X" + data[1:])
        with pytest.raises(RegistryDigestMismatch, match=f"blob {digest} in test/corrupt"):
            await client.fetch_blob_to_file("test/corrupt", digest, tmp_path / "blob")
        with pytest.raises(ProtocolError, match="more than the expected 100 bytes"):
            await client.fetch_blob_to_file("test/corrupt", digest, tmp_path / "blob", size=100)
        wrong = sha256_digest(b"something else")
        with pytest.raises(RegistryDigestMismatch, match=f"blob {wrong} to test/corrupt: PUT .* 400 .*DIGEST_INVALID"):
            await client.push_blob("test/corrupt", b"some data", wrong)
    assert list(tmp_path.iterdir()) == []


async def test_reference_must_match_registry(registry: RegistryServer) -> None:
    async with registry.client() as client:
        with pytest.raises(ValueError, match="not on registry"):
            await client.get_manifest("docker.io/library/busybox")


def _serve_manifest(body: bytes, digest_header: str) -> type[http.server.BaseHTTPRequestHandler]:
    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        return 200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest_header}, body

    return scripted_handler(respond)


async def test_hostile_manifests() -> None:
    config = Descriptor(OCI_CONFIG, sha256_digest(b"{}"), 2)
    good = build_manifest(config, [])
    with local_http_server(_serve_manifest(good, sha256_digest(b"other"))) as url:
        async with RegistryClient(url[7:], plain_http=True, docker_config=False, retry=FAST_RETRY) as client:
            with pytest.raises(RegistryDigestMismatch, match="manifest"):
                await client.get_manifest(f"{url[7:]}/x:y")
    huge = b" " * (MAX_MANIFEST_SIZE + 1)
    with local_http_server(_serve_manifest(huge, "")) as url:
        async with RegistryClient(url[7:], plain_http=True, docker_config=False) as client:
            with pytest.raises(ProtocolError, match="exceeds the 4194304-byte limit"):
                await client.get_manifest(f"{url[7:]}/x:y")


async def test_blob_redirect_is_followed(registry: RegistryServer) -> None:
    data = _data(300_000)
    async with registry.client() as client:
        digest = await client.push_blob("test/redir", data)

    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        return 307, {"Location": f"{registry.url}{request.path}"}, b""

    with local_http_server(scripted_handler(respond)) as url:
        async with (
            RegistryClient(url[7:], plain_http=True, docker_config=False) as client,
            client.get_blob_stream("test/redir", digest, offset=1000, length=2000) as stream,
        ):
            assert b"".join([chunk async for chunk in stream]) == data[1000:3000]


async def test_ignored_range_is_an_error() -> None:
    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        return 200, {}, b"whole blob"

    with local_http_server(scripted_handler(respond)) as url:
        async with RegistryClient(url[7:], plain_http=True, docker_config=False) as client:
            with pytest.raises(ProtocolError, match=r"ignored the Range request \(answered 200\)"):
                async with client.get_blob_stream("x", sha256_digest(b"whole blob"), offset=5):
                    pass
