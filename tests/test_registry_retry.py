"""Retries, backoff and failure reporting, against small in-process HTTP servers."""

from __future__ import annotations

import http.server
import re
import ssl
import threading
import time
from pathlib import Path

import pytest
import trio

from lazyfs.registry.client import RegistryClient
from lazyfs.registry.digest import sha256_digest
from lazyfs.registry.errors import ProtocolError, UnavailableError
from lazyfs.registry.transport import RetryPolicy
from tests.registry_fixtures import KeyPair, Response, free_port, local_http_server, scripted_handler


class Script:
    """Answers requests from a list of statuses (the last one repeats) and records what was asked."""

    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        self.statuses = statuses
        self.headers = headers or {}
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def respond(self, request: http.server.BaseHTTPRequestHandler) -> Response:
        with self._lock:
            self.requests.append(f"{request.command} {request.path}")
            status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        return status, self.headers if status != 200 else {}, b"{}"


def _client(url: str, retry: RetryPolicy) -> RegistryClient:
    return RegistryClient(url.removeprefix("http://"), plain_http=True, docker_config=False, retry=retry, timeout=5)


async def test_retries_503_then_succeeds() -> None:
    script = Script([503, 503, 200])
    with local_http_server(scripted_handler(script.respond)) as url:
        async with _client(url, RetryPolicy(attempts=3, backoff=0.05, max_delay=1)) as client:
            start = time.monotonic()
            await client.ping()
            elapsed = time.monotonic() - start
    assert script.requests == ["GET /v2/"] * 3
    # Backoff waited 0.05*[0.5, 1] then 0.1*[0.5, 1] seconds.
    assert 0.07 <= elapsed < 2


async def test_retry_after_is_honoured_but_capped() -> None:
    script = Script([429, 200], {"Retry-After": "3600"})
    with local_http_server(scripted_handler(script.respond)) as url:
        async with _client(url, RetryPolicy(attempts=2, backoff=0.001, max_delay=0.3)) as client:
            start = time.monotonic()
            await client.ping()
    assert 0.3 <= time.monotonic() - start < 2
    assert len(script.requests) == 2


async def test_persistent_500_gives_up() -> None:
    script = Script([500])
    with local_http_server(scripted_handler(script.respond)) as url:
        async with _client(url, RetryPolicy(attempts=4, backoff=0.01, max_delay=0.05)) as client:
            with trio.fail_after(5):
                with pytest.raises(UnavailableError, match=r"manifest .*/x/y:latest: GET .*: 500 .* after 4 attempt"):
                    await client.get_manifest(f"{url[7:]}/x/y")
    assert len(script.requests) == 4


async def test_uploads_are_not_retried_on_5xx() -> None:
    script = Script([404, 202, 500], {"Location": "/v2/x/blobs/uploads/u1"})
    with local_http_server(scripted_handler(script.respond)) as url:
        async with _client(url, RetryPolicy(attempts=5, backoff=0.01)) as client:
            with pytest.raises(UnavailableError, match=r"PUT .*/v2/x/blobs/uploads/u1: 500"):
                await client.push_blob("x", b"data")
    assert [r.split(" ")[0] for r in script.requests] == ["HEAD", "POST", "PUT"]


async def test_connection_refused() -> None:
    port = free_port()
    async with _client(f"http://127.0.0.1:{port}", RetryPolicy(attempts=2, backoff=0.01)) as client:
        with pytest.raises(UnavailableError, match=rf"registry 127.0.0.1:{port}: GET .*: .*ConnectError"):
            await client.ping()


async def test_plain_http_must_be_asked_for(key_pair: KeyPair) -> None:
    trust = ssl.create_default_context(cafile=str(key_pair.cert_path))
    with local_http_server(scripted_handler(Script([200]).respond)) as url:
        async with RegistryClient(url[7:], docker_config=False, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(UnavailableError, match=f"GET https://{url[7:]}/v2/ failed: ConnectError"):
                await client.ping()
    redirect = Script([307], {"Location": "http://127.0.0.1:1/v2/"})
    challenge = Script([401], {"WWW-Authenticate": 'Bearer realm="http://127.0.0.1:1/token",service="s"'})
    for script, refused in [(redirect, "/v2/"), (challenge, "/token?service=s")]:
        with local_http_server(scripted_handler(script.respond), tls=key_pair) as url:
            async with RegistryClient(url[8:], docker_config=False, verify=trust) as client:
                with pytest.raises(
                    ProtocolError, match=re.escape(f"refusing plain-HTTP request to http://127.0.0.1:1{refused}")
                ):
                    await client.ping()


async def test_tls_with_private_ca(key_pair: KeyPair) -> None:
    trust = ssl.create_default_context(cafile=str(key_pair.cert_path))
    with local_http_server(scripted_handler(Script([200]).respond), tls=key_pair) as url:
        async with RegistryClient(url[8:], docker_config=False, verify=trust) as client:
            await client.ping()
        async with RegistryClient(url[8:], docker_config=False, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.ping()


async def test_interrupted_download(tmp_path: Path) -> None:
    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        return 200, {"Content-Length": "100000", "Connection": "close"}, b"x" * 10

    with local_http_server(scripted_handler(respond)) as url:
        async with _client(url, RetryPolicy(attempts=1)) as client:
            with pytest.raises(UnavailableError, match=r"blob sha256:\w+ in x/y: download interrupted: .*Protocol"):
                await client.fetch_blob_to_file("x/y", sha256_digest(b"x" * 100000), tmp_path / "blob")
    assert list(tmp_path.iterdir()) == []
