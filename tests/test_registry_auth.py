"""Registry authentication against real registries: htpasswd basic auth and bearer tokens."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio

from lazyfs.registry.auth import Credentials
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.errors import AuthError
from tests.registry_fixtures import (
    FAST_RETRY,
    PASSWORD,
    USERNAME,
    RegistryServer,
    TokenService,
    make_layer_tar,
    push_test_image,
)


async def _round_trip(client: RegistryClient, repo: str) -> None:
    """Push an image and read it back, exercising pull and push scopes."""
    pushed = await push_test_image(client, repo, "v1", [make_layer_tar({"f": b"data"})])
    manifest = await client.get_manifest(pushed.reference)
    assert manifest.digest == pushed.manifest.digest
    async with client.get_blob_stream(repo, manifest.layers[0].digest, offset=2, length=5) as stream:
        assert b"".join([c async for c in stream]) == pushed.blobs[manifest.layers[0].digest][2:7]


async def test_basic_auth(auth_registry: RegistryServer) -> None:
    async with auth_registry.client() as client:
        await client.ping()
        await _round_trip(client, "private/app")


async def test_basic_auth_wrong_password(auth_registry: RegistryServer) -> None:
    async with auth_registry.client(credentials=Credentials(USERNAME, "wrong")) as client:
        with pytest.raises(AuthError, match=rf"GET http://{auth_registry.host}/v2/: 401 Unauthorized: credentials"):
            await client.ping()
        with pytest.raises(AuthError, match="401"):
            await client.get_manifest(f"{auth_registry.host}/private/app:v1")


async def test_basic_auth_without_credentials(auth_registry: RegistryServer) -> None:
    async with auth_registry.client(credentials=None) as client:
        with pytest.raises(AuthError, match=rf"401 Unauthorized: registry {auth_registry.host} needs a login"):
            await client.blob_exists("private/app", "sha256:" + "0" * 64)


async def test_credentials_from_docker_config(
    auth_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"auths": {f"http://{auth_registry.host}": {"auth": encoded}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    async with RegistryClient(auth_registry.host, plain_http=True, retry=FAST_RETRY) as client:
        await client.ping()
    async with RegistryClient(auth_registry.host, plain_http=True, docker_config=False) as client:
        with pytest.raises(AuthError, match="needs a login"):
            await client.ping()


async def test_bearer_token_auth(token_registry: RegistryServer, token_service: TokenService) -> None:
    async with token_registry.client() as client:
        await client.ping()
        await _round_trip(client, "tok/app")
        await client.get_manifest(f"{token_registry.host}/tok/app:v1")
    users = {user for user, _ in token_service.requests}
    assert users == {USERNAME}
    scopes = [tuple(scopes) for _, scopes in token_service.requests]
    # One token per distinct scope set: tokens are cached and reused.
    assert sorted(scopes) == sorted(set(scopes))
    assert ("repository:tok/app:pull",) in scopes and ("repository:tok/app:pull,push",) in scopes


async def test_bearer_oauth2_access_token(token_registry: RegistryServer, token_service: TokenService) -> None:
    token_service.token_field = "access_token"
    async with token_registry.client() as client:
        await _round_trip(client, "tok/oauth")


async def test_bearer_cross_repo_mount(token_registry: RegistryServer, token_service: TokenService) -> None:
    async with token_registry.client() as client:
        digest = await client.push_blob("tok/base", b"shared layer")
        assert await client.push_blob("tok/app", b"shared layer", mount_from="tok/base") == digest
    assert (USERNAME, ["repository:tok/app:pull,push", "repository:tok/base:pull"]) in token_service.requests
    assert [e.status for e in token_registry.access_log() if e.method == "POST"] == [202, 201]


async def test_bearer_refusals(token_registry: RegistryServer) -> None:
    async with token_registry.client(credentials=Credentials(USERNAME, "wrong")) as client:
        with pytest.raises(AuthError, match=rf"token service .*/token refused user 'lazyfs' for {token_registry.host}"):
            await client.ping()
    async with token_registry.client(credentials=None) as client:
        # The token service grants anonymous users nothing, so the registry refuses their token.
        with pytest.raises(AuthError, match=r"manifest .*/tok/none:latest: GET .* 401 Unauthorized: registry"):
            await client.get_manifest(f"{token_registry.host}/tok/none")


async def test_concurrent_requests_share_a_token(token_registry: RegistryServer, token_service: TokenService) -> None:
    async with token_registry.client() as client:
        await client.ping()
        token_service.requests.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client.blob_exists, "tok/busy", "sha256:" + "0" * 64)
    assert token_service.requests == [(USERNAME, ["repository:tok/busy:pull"])]
