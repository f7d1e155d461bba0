"""Blob redirects to storage URLs are remembered: later reads skip the registry and never carry its credentials."""

from __future__ import annotations

import contextlib
import http.server
import re
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from lazyfs.registry.auth import Credentials
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.digest import sha256_digest
from lazyfs.registry.redirects import EXPIRY_MARGIN, RedirectCache, signed_expiry
from lazyfs.registry.transport import RetryPolicy
from tests.registry_fixtures import (
    FAST_RETRY,
    PASSWORD,
    USERNAME,
    KeyPair,
    RegistryServer,
    Response,
    local_http_server,
    scripted_handler,
)

REPO = "team/app"
DATA = bytes((i * 31) % 251 for i in range(300_000))
DIGEST = sha256_digest(DATA)
NOW = 1_700_000_000.0  # 20231114T221320Z
# Backoff so long that any retry sleep would trip the tests' deadlines.
SLOW_RETRY = RetryPolicy(attempts=3, backoff=10.0, max_delay=10.0)
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
_BASIC = Credentials(USERNAME, PASSWORD).basic_header()


class Storage:
    """A blob store: serves DATA with Range support, fails on demand, records every request's headers."""

    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.authorizations: list[str] = []
        self.failures: list[int] = []
        self._lock = threading.Lock()

    def respond(self, request: http.server.BaseHTTPRequestHandler) -> Response:
        with self._lock:
            self.ranges.append(request.headers.get("Range"))
            if "Authorization" in request.headers:
                self.authorizations.append(request.headers["Authorization"])
            if self.failures:
                return self.failures.pop(0), {"Connection": "close"}, b"<Error>expired</Error>"
        match = _RANGE_RE.fullmatch(request.headers.get("Range", ""))
        if not match:
            return 200, {"Connection": "close"}, DATA
        start = int(match.group(1))
        end = min(int(match.group(2) or len(DATA) - 1), len(DATA) - 1)
        headers = {"Content-Range": f"bytes {start}-{end}/{len(DATA)}", "Connection": "close"}
        return 206, headers, DATA[start : end + 1]


class Front:
    """A registry front requiring basic auth that 307-redirects blob GETs to *location*; answers ``/v2/`` itself."""

    def __init__(self, location: str = "") -> None:
        self.location = location
        self.redirects = 0
        self._lock = threading.Lock()

    def respond(self, request: http.server.BaseHTTPRequestHandler) -> Response:
        if request.headers.get("Authorization") != _BASIC:
            return 401, {"WWW-Authenticate": 'Basic realm="front"'}, b""
        if request.path == "/v2/":
            return 200, {"Content-Type": "application/json"}, b"{}"
        assert request.command == "GET" and request.path == f"/v2/{REPO}/blobs/{DIGEST}", request.path
        with self._lock:
            self.redirects += 1
        return 307, {"Location": self.location}, b""


@contextlib.contextmanager
def redirecting(query: str = "") -> Iterator[tuple[Front, Storage, str]]:
    """A front redirecting to a storage server at ``/data/<digest><query>``; yields both and the front's URL."""
    front, storage = Front(), Storage()
    with (
        local_http_server(scripted_handler(storage.respond)) as storage_url,
        local_http_server(scripted_handler(front.respond)) as front_url,
    ):
        front.location = f"{storage_url}/data/{DIGEST}{query}"
        yield front, storage, front_url


def _client(url: str, **options: Any) -> RegistryClient:
    """A client for the front at *url*, logged in as USERNAME, with plain HTTP and fast retries by default."""
    settings: dict[str, Any] = {"plain_http": True, "retry": FAST_RETRY, "timeout": 5.0, **options}
    return RegistryClient(
        url.split("://")[1], credentials=Credentials(USERNAME, PASSWORD), docker_config=False, **settings
    )


async def _read(client: RegistryClient, offset: int = 0, length: int | None = None, repo: str = REPO) -> bytes:
    async with client.get_blob_stream(repo, DIGEST, offset=offset, length=length) as stream:
        return b"".join([chunk async for chunk in stream])


async def test_ranged_reads_go_straight_to_storage() -> None:
    ranges = [((i * 7919) % 290_000, 1000 + i) for i in range(40)]
    with redirecting() as (front, storage, url):
        async with _client(url) as client:
            await client.ping()
            for offset, length in ranges:
                assert await _read(client, offset, length) == DATA[offset : offset + length]
            assert await _read(client) == DATA
    assert front.redirects == 1
    assert storage.ranges == [f"bytes={o}-{o + n - 1}" for o, n in ranges] + [None]
    assert storage.authorizations == []


@pytest.mark.parametrize(
    ("query", "lifetime"),
    [
        ("", 60.0),
        ("?X-Amz-Date=20231114T221320Z&X-Amz-Expires=300&X-Amz-Signature=abc", 300 - EXPIRY_MARGIN),
        (f"?Expires={int(NOW) + 900}&Signature=abc", 900 - EXPIRY_MARGIN),
    ],
)
async def test_remembered_redirect_expires(query: str, lifetime: float) -> None:
    now = [NOW]
    cache = RedirectCache(ttl=60.0, clock=lambda: now[0])
    with redirecting(query) as (front, storage, url):
        async with _client(url, redirects=cache) as client:
            assert await _read(client, 10, 20) == DATA[10:30]
            now[0] += lifetime - 1
            assert await _read(client, 30, 20) == DATA[30:50]
            assert front.redirects == 1
            now[0] += 2
            assert await _read(client, 50, 20) == DATA[50:70]
            assert front.redirects == 2
    assert len(storage.ranges) == 3 and storage.authorizations == []


@pytest.mark.parametrize("status", [401, 403, 404, 410, 503])
async def test_failing_storage_url_falls_back_to_the_registry(status: int) -> None:
    with redirecting() as (front, storage, url):
        async with _client(url, retry=SLOW_RETRY) as client:
            assert await _read(client, 0, 100) == DATA[:100]
            storage.failures.append(status)
            with trio.fail_after(3):
                assert await _read(client, 100, 100) == DATA[100:200]
            assert front.redirects == 2
            assert await _read(client, 200, 100) == DATA[200:300]
    assert front.redirects == 2
    assert storage.ranges == ["bytes=0-99", "bytes=100-199", "bytes=100-199", "bytes=200-299"]
    assert storage.authorizations == []


async def test_unreachable_storage_falls_back_to_the_registry() -> None:
    front, gone, moved = Front(), Storage(), Storage()
    with local_http_server(scripted_handler(front.respond)) as url:
        async with _client(url, retry=SLOW_RETRY) as client:
            with local_http_server(scripted_handler(gone.respond)) as storage_url:
                front.location = f"{storage_url}/data/{DIGEST}"
                assert await _read(client, 0, 10) == DATA[:10]
            with local_http_server(scripted_handler(moved.respond)) as storage_url:
                front.location = f"{storage_url}/data/{DIGEST}"
                with trio.fail_after(3):
                    assert await _read(client, 10, 10) == DATA[10:20]
    assert front.redirects == 2
    assert gone.ranges == ["bytes=0-9"] and moved.ranges == ["bytes=10-19"]


async def test_redirect_that_kept_credentials_is_not_remembered() -> None:
    """A same-origin redirect was fetched with the Authorization header, so replaying it without one is wrong."""
    front = Front()

    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        if request.path.startswith("/storage/"):
            assert request.headers.get("Authorization") == _BASIC
            return 200, {}, DATA
        return front.respond(request)

    cache = RedirectCache()
    with local_http_server(scripted_handler(respond)) as url:
        front.location = f"{url}/storage/{DIGEST}"
        async with _client(url, redirects=cache) as client:
            for _ in range(3):
                assert await _read(client) == DATA
    assert front.redirects == 3
    assert len(cache) == 0


async def test_no_redirect_remembers_nothing(registry: RegistryServer) -> None:
    cache = RedirectCache()
    async with registry.client(redirects=cache) as client:
        assert await client.push_blob(REPO, DATA) == DIGEST
        for offset in (0, 1000, 2000):
            assert await _read(client, offset, 500) == DATA[offset : offset + 500]
    assert len(cache) == 0
    gets = [e for e in registry.access_log() if e.method == "GET" and DIGEST in e.path]
    assert [e.status for e in gets] == [206, 206, 206]


async def test_cached_plain_http_url_needs_plain_http(key_pair: KeyPair) -> None:
    front, secure, plain = Front(), Storage(), Storage()
    trust = ssl.create_default_context(cafile=str(key_pair.cert_path))
    cache = RedirectCache()
    with (
        local_http_server(scripted_handler(secure.respond), tls=key_pair) as secure_url,
        local_http_server(scripted_handler(plain.respond)) as plain_url,
        local_http_server(scripted_handler(front.respond), tls=key_pair) as url,
    ):
        front.location = f"{secure_url}/data/{DIGEST}"
        cache.put((REPO, DIGEST), httpx.URL(f"{plain_url}/data/{DIGEST}"))
        async with _client(url, plain_http=False, verify=trust, redirects=cache) as client:
            assert await _read(client, 5, 5) == DATA[5:10]
            assert await _read(client, 10, 5) == DATA[10:15]
    assert plain.ranges == []
    assert front.redirects == 1 and secure.ranges == ["bytes=5-9", "bytes=10-14"]
    assert cache.get((REPO, DIGEST)) == httpx.URL(f"{secure_url}/data/{DIGEST}")


def test_signed_expiry() -> None:
    def expiry(query: str) -> float | None:
        return signed_expiry(httpx.URL(f"https://storage.example/blob?{query}"), NOW)

    assert expiry("X-Amz-Date=20231114T221320Z&X-Amz-Expires=1200") == NOW + 1200
    assert expiry("X-Goog-Date=20231114T221420Z&X-Goog-Expires=600") == NOW + 660
    assert expiry("X-Amz-Expires=300") == NOW + 300  # no date: counted from now
    assert expiry("X-Amz-Date=garbage&X-Amz-Expires=300") == NOW + 300
    assert expiry(f"Expires={int(NOW) + 42}&Signature=x") == NOW + 42
    assert expiry("Expires=tomorrow") is None
    assert expiry("verify=1700000000-abc") is None


def test_cache_is_lru_and_skips_urls_about_to_expire() -> None:
    cache = RedirectCache(max_entries=2, clock=lambda: NOW)
    urls = {name: httpx.URL(f"https://storage.example/{name}") for name in "abc"}
    cache.put(("r", "a"), urls["a"])
    cache.put(("r", "b"), urls["b"])
    assert cache.get(("r", "a")) == urls["a"]  # now "b" is the least recently used
    cache.put(("r", "c"), urls["c"])
    assert cache.get(("r", "b")) is None
    assert cache.get(("r", "a")) == urls["a"] and cache.get(("r", "c")) == urls["c"]
    cache.put(("r", "a"), httpx.URL(f"https://storage.example/a?Expires={int(NOW + EXPIRY_MARGIN)}"))
    assert cache.get(("r", "a")) is None and len(cache) == 1
