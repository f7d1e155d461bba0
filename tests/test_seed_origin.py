"""The back-to-source client against a hostile in-process HTTP server and real docker-registry instances."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.server
import json
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import trio

from lazyfs.registry.auth import Credentials
from p2p.ratelimit import RateLimiter
from seed.origin import Origin, OriginError, forwarded_headers
from tests.registry_fixtures import (
    PASSWORD,
    USERNAME,
    RegistryServer,
    TokenService,
    local_http_server,
    make_layer_tar,
    push_test_image,
)

BIG = random.Random(7).randbytes(8 << 20)
SMALL = BIG[:100_000]
USER_TOKEN, ANON_TOKEN = "tok-user", "tok-anon"
BASIC = Credentials(USERNAME, PASSWORD).basic_header()
WRONG_BASIC = Credentials(USERNAME, "wrong").basic_header()


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request the hostile server received."""

    method: str
    host: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclasses.dataclass
class Hostile:
    """State shared with the server's handler threads."""

    url: str = ""
    requests: list[Seen] = dataclasses.field(default_factory=list)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    hits: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def seen(self, path: str, method: str = "GET") -> list[Seen]:
        """Requests for *path* (query removed) with *method*."""
        return [r for r in self.requests if r.path == path and r.method == method]


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """Chooses its behaviour by the request path (see ROUTES); ``state`` is set per server by :func:`_handler`."""

    protocol_version = "HTTP/1.1"
    state: ClassVar[Hostile]
    body: bytes

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # clients may hang up at any time
            super().handle()

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        query = urllib.parse.parse_qs(url.query)
        self.state.requests.append(Seen(self.command, headers.get("host", ""), url.path, query, headers))
        self.state.hits[url.path] += 1
        self.body = BIG if url.path == "/big" else SMALL
        route = ROUTES.get(url.path) or next(
            (action for prefix, action in PREFIX_ROUTES.items() if url.path.startswith(prefix)), _missing
        )
        route(self, self.state, url.path)

    def answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        """Send a response; Content-Length is added unless given or the connection closes after the body."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and "Connection" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def requested_range(self) -> tuple[int, int] | None:
        """The first and last byte of a ``Range: bytes=a-b`` request, clipped to the body."""
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        return (int(match[1]), min(int(match[2]), len(self.body) - 1)) if match else None


def _handler(state: Hostile) -> type[HostileHandler]:
    """A handler class bound to *state*."""
    return type("Handler", (HostileHandler,), {"state": state})


Route = Callable[[HostileHandler, Hostile, str], None]


def _ranged(h: HostileHandler, state: Hostile, path: str) -> None:
    """Serve the body, honouring Range; HEAD advertises byte ranges."""
    wanted = h.requested_range()
    if wanted is None or h.command == "HEAD":
        h.answer(200, {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}, h.body)
        return
    first, last = wanted
    h.answer(206, {"Content-Range": f"bytes {first}-{last}/{len(h.body)}"}, h.body[first : last + 1])


def _no_head(h: HostileHandler, state: Hostile, path: str) -> None:
    if h.command == "HEAD":
        h.answer(405, {})
    else:
        _ranged(h, state, path)


def _no_length(h: HostileHandler, state: Hostile, path: str) -> None:
    if h.command == "HEAD":
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
    else:
        _ranged(h, state, path)


def _no_range(h: HostileHandler, state: Hostile, path: str) -> None:
    h.answer(200, {}, h.body)


def _flaky(h: HostileHandler, state: Hostile, path: str) -> None:
    """``/flaky/STATUS/N`` answers STATUS (with Retry-After: 0) to its first N requests."""
    _, _, status, count = path.split("/")
    if state.hits[path] <= int(count):
        h.answer(int(status), {"Retry-After": "0"}, b"boom")
    else:
        _ranged(h, state, path)


def _broken(h: HostileHandler, state: Hostile, path: str) -> None:
    h.answer(500, {}, b"boom")


def _missing(h: HostileHandler, state: Hostile, path: str) -> None:
    h.answer(404, {}, b"no such thing")


def _hang(h: HostileHandler, state: Hostile, path: str) -> None:
    state.release.wait(30)
    h.close_connection = True


def _partial(h: HostileHandler, state: Hostile, path: str) -> None:
    """Misbehave inside a 206: stall midway, stop short, or send too much."""
    wanted = h.requested_range()
    assert wanted is not None
    first, last = wanted
    part = h.body[first : last + 1]
    headers = {"Content-Range": f"bytes {first}-{last}/{len(h.body)}"}
    h.close_connection = True
    if path == "/stall":
        h.answer(206, {**headers, "Content-Length": str(len(part))}, part[: len(part) // 2])
        h.wfile.flush()
        state.release.wait(30)
    elif path == "/short":
        h.answer(206, {**headers, "Content-Length": str(len(part))}, part[:-10])
    elif path == "/short-close":
        h.answer(206, {**headers, "Connection": "close"}, part[:-10])
    elif path == "/long-close":
        h.answer(206, {**headers, "Connection": "close"}, part + b"x" * 100)
    elif path == "/long-declared":
        h.answer(206, {**headers, "Content-Length": str(len(part) + 100)}, part + b"x" * 100)
    else:  # /wrong-range: the bytes one further on
        h.answer(206, {"Content-Range": f"bytes {first + 1}-{last + 1}/{len(h.body)}"}, h.body[first + 1 : last + 2])


def _redirect(h: HostileHandler, state: Hostile, path: str) -> None:
    targets = {
        "/redirect-other": (307, f"http://localhost:{state.port}/file"),
        "/redirect-same": (302, "/file"),
        "/loop": (302, "/loop"),
    }
    status, location = targets[path]
    h.answer(status, {"Location": location})


def _rotating(h: HostileHandler, state: Hostile, path: str) -> None:
    """``/rotating`` redirects to a fresh ``/once/N``, which serves two requests and then has expired."""
    if path == "/rotating":
        h.answer(307, {"Location": f"/once/{state.hits[path]}"})
    elif state.hits[path] <= 2:
        _ranged(h, state, path)
    else:
        h.answer(403, {}, b"signature expired")


def _empty(h: HostileHandler, state: Hostile, path: str) -> None:
    """Empty content, HEAD refused: a one-byte range cannot be satisfied."""
    h.answer(405 if h.command == "HEAD" else 416, {"Content-Range": "bytes */0"})


def _bearer(h: HostileHandler, state: Hostile, path: str) -> None:
    """Registry-style blob: ``/v2/private/...`` wants the user's token, ``/v2/public/...`` any token."""
    repo = path.split("/")[2]
    accepted = {f"Bearer {USER_TOKEN}"} | ({f"Bearer {ANON_TOKEN}"} if repo == "public" else set())
    if h.headers.get("Authorization") in accepted:
        _ranged(h, state, path)
        return
    challenge = f'Bearer realm="{state.url}/token",service="hostile",scope="repository:{repo}:pull"'
    h.answer(401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, b'{"errors":[]}')


def _token(h: HostileHandler, state: Hostile, path: str) -> None:
    authorization = h.headers.get("Authorization")
    if authorization not in (None, BASIC):
        h.answer(401, {}, b"bad login")
        return
    token = USER_TOKEN if authorization else ANON_TOKEN
    h.answer(200, {"Content-Type": "application/json"}, json.dumps({"token": token, "expires_in": 300}).encode())


def _basic(h: HostileHandler, state: Hostile, path: str) -> None:
    if h.headers.get("Authorization") == BASIC:
        _ranged(h, state, path)
    else:
        h.answer(401, {"WWW-Authenticate": 'Basic realm="hostile"'}, b"")


def _trickle(h: HostileHandler, state: Hostile, path: str) -> None:
    """A ranged answer dribbled out in 7 KiB writes, as over a slow link."""
    wanted = h.requested_range()
    first, last = wanted if wanted is not None else (0, len(h.body) - 1)
    h.send_response(206 if wanted is not None else 200)
    h.send_header("Content-Range", f"bytes {first}-{last}/{len(h.body)}")
    h.send_header("Content-Length", str(last + 1 - first))
    h.end_headers()
    for start in range(first, last + 1, 7 << 10):
        h.wfile.write(h.body[start : min(start + (7 << 10), last + 1)])
        h.wfile.flush()
        time.sleep(0.0005)


ROUTES: dict[str, Route] = {
    "/file": _ranged,
    "/trickle": _trickle,
    "/big": _ranged,
    "/no-head": _no_head,
    "/no-length": _no_length,
    "/no-range": _no_range,
    "/broken": _broken,
    "/hang": _hang,
    "/token": _token,
    "/basic": _basic,
    "/rotating": _rotating,
    "/empty": _empty,
    **dict.fromkeys(["/redirect-other", "/redirect-same", "/loop"], _redirect),
    **dict.fromkeys(["/stall", "/short", "/short-close", "/long-close", "/long-declared", "/wrong-range"], _partial),
}
PREFIX_ROUTES: dict[str, Route] = {"/flaky/": _flaky, "/once/": _rotating, "/v2/": _bearer}


def fast_origin(max_redirects: int = 10) -> Origin:
    """An origin client with short timeouts and backoff and three attempts."""
    return Origin(timeout=2.0, retries=3, backoff=0.01, max_redirects=max_redirects)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    state = Hostile()
    with local_http_server(_handler(state)) as url:
        state.url = url
        try:
            yield state
        finally:
            state.release.set()


async def test_stat_and_read_ranges(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        info = await origin.stat(f"{hostile.url}/file", {})
        assert (info.content_length, info.ranges) == (len(SMALL), True)
        assert info.headers["content-type"] == "application/octet-stream"
        assert await origin.read(f"{hostile.url}/file", {}, 0, 10) == SMALL[:10]
        assert await origin.read(f"{hostile.url}/file", {}, 99_000, 1000) == SMALL[99_000:]
    assert [r.headers.get("range") for r in hostile.requests] == [None, "bytes=0-9", "bytes=99000-99999"]
    assert all(r.headers["accept-encoding"] == "identity" for r in hostile.requests)


@pytest.mark.parametrize("path", ["/no-head", "/no-length"])
async def test_stat_falls_back_to_one_byte_get(hostile: Hostile, path: str) -> None:
    async with fast_origin() as origin:
        info = await origin.stat(f"{hostile.url}{path}", {})
    assert (info.content_length, info.ranges) == (len(SMALL), True)
    assert [(r.method, r.headers.get("range")) for r in hostile.requests] == [("HEAD", None), ("GET", "bytes=0-0")]


async def test_stat_of_empty_content(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        info = await origin.stat(f"{hostile.url}/empty", {})
    assert (info.content_length, info.ranges) == (0, True)


async def test_trickled_bodies_and_the_pooled_connection_after_them(hostile: Hostile) -> None:
    url = f"{hostile.url}/trickle"
    async with fast_origin() as origin:  # a receive low-water mark left too high would stall a read: 2 s timeout
        with trio.fail_after(10):
            for offset, length in ((0, 90_000), (5, 10), (1000, 70_000), (99_990, 10)):
                assert await origin.read(url, {}, offset, length) == SMALL[offset : offset + length]
    assert hostile.hits["/trickle"] == 4  # each read once: none timed out and was retried


async def test_origin_ignoring_range(hostile: Hostile) -> None:
    url = f"{hostile.url}/no-range"
    async with fast_origin() as origin:
        info = await origin.stat(url, {})
        assert (info.content_length, info.ranges) == (len(SMALL), False)
        assert await origin.read(url, {}, 0, len(SMALL)) == SMALL  # the whole body is what was asked for
        hostile.requests.clear()
        with pytest.raises(OriginError, match=r"ignored Range bytes=0-9 and sent the whole content of 100000 bytes"):
            await origin.read(url, {}, 0, 10)
        with pytest.raises(OriginError, match=r"ignored Range bytes=5-14") as caught:
            await origin.read(url, {}, 5, 10)
    assert not caught.value.retryable and caught.value.status == 200
    assert len(hostile.requests) == 2  # not retried


@pytest.mark.parametrize("status", [500, 503, 429, 408])
async def test_transient_errors_are_retried(hostile: Hostile, status: int) -> None:
    async with fast_origin() as origin:
        assert await origin.read(f"{hostile.url}/flaky/{status}/2", {}, 10, 5) == SMALL[10:15]
    assert len(hostile.seen(f"/flaky/{status}/2")) == 3


async def test_gives_up_after_all_attempts(hostile: Hostile) -> None:
    url = f"{hostile.url}/broken"
    async with fast_origin() as origin:
        with pytest.raises(OriginError) as caught:
            await origin.read(url, {}, 0, 10)
    assert str(caught.value) == f"origin {url} answered 500 Internal Server Error after 3 attempts"
    assert caught.value.status == 500
    assert len(hostile.seen("/broken")) == 3


async def test_client_errors_are_not_retried(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        with pytest.raises(OriginError, match=r"answered 404 Not Found$") as caught:
            await origin.stat(f"{hostile.url}/nothing", {})
    assert (caught.value.status, caught.value.retryable) == (404, False)
    assert len(hostile.requests) == 1


@pytest.mark.parametrize("path", ["/hang", "/stall"])
async def test_unresponsive_origin_times_out(hostile: Hostile, path: str) -> None:
    start = trio.current_time()
    async with Origin(timeout=0.3, retries=2, backoff=0.01) as origin:
        with trio.fail_after(5), pytest.raises(OriginError, match=r"after 2 attempts$"):
            await origin.read(f"{hostile.url}{path}", {}, 0, 50_000)
    assert trio.current_time() - start < 2.0
    assert len(hostile.seen(path)) == 2


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/short", r"broke off after 990 of 1000 bytes"),
        ("/short-close", r"sent 990 of 1000 bytes after 3 attempts"),
    ],
)
async def test_short_body_is_retried(hostile: Hostile, path: str, message: str) -> None:
    async with fast_origin() as origin:
        with pytest.raises(OriginError, match=message) as caught:
            await origin.read(f"{hostile.url}{path}", {}, 100, 1000)
    assert caught.value.retryable
    assert len(hostile.seen(path)) == 3


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/long-close", r"sent more than the 1000 bytes asked for"),
        ("/long-declared", r"declared 1100 bytes for the 1000-byte range 100-1099"),
        ("/wrong-range", r"answered Content-Range 'bytes 101-1100/100000' for bytes 100-1099"),
    ],
)
async def test_wrong_body_is_refused(hostile: Hostile, path: str, message: str) -> None:
    async with fast_origin() as origin:
        with pytest.raises(OriginError, match=message) as caught:
            await origin.read(f"{hostile.url}{path}", {}, 100, 1000)
    assert not caught.value.retryable
    assert len(hostile.seen(path)) == 1


async def test_request_headers_pass_through(hostile: Hostile) -> None:
    caller = {
        "Authorization": "Bearer from-the-client",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Private",
        "X-Private": "dropped",
        "Keep-Alive": "timeout=5",
        "Host": "evil.example",
        "Range": "bytes=0-99999",
        "Content-Length": "3",
        "Accept-Encoding": "gzip",
    }
    assert set(forwarded_headers(caller)) == {"authorization", "x-custom"}
    async with fast_origin() as origin:
        assert await origin.read(f"{hostile.url}/file", caller, 7, 3) == SMALL[7:10]
    seen = hostile.requests[0].headers
    assert seen["authorization"] == "Bearer from-the-client" and seen["x-custom"] == "kept"
    assert seen["host"] == f"127.0.0.1:{hostile.port}" and seen["range"] == "bytes=7-9"
    assert {"x-private", "keep-alive", "content-length"}.isdisjoint(seen)
    assert seen["accept-encoding"] == "identity"


async def test_redirect_to_another_host_is_cached_and_gets_no_credentials(hostile: Hostile) -> None:
    url = f"{hostile.url}/redirect-other"
    headers = {"Authorization": BASIC, "Cookie": "session=1"}
    async with fast_origin() as origin:
        assert await origin.read(url, headers, 0, 100) == SMALL[:100]
        assert await origin.read(url, headers, 100, 100) == SMALL[100:200]
        assert (await origin.stat(url, headers)).content_length == len(SMALL)
    assert [r.method for r in hostile.seen("/redirect-other")] == ["GET"]  # the second read used the cache
    first, *_ = hostile.seen("/redirect-other")
    assert first.headers["authorization"] == BASIC
    storage = [r for r in hostile.requests if r.path == "/file"]
    assert {r.host for r in storage} == {f"localhost:{hostile.port}"}
    assert all("authorization" not in r.headers and "cookie" not in r.headers for r in storage)


async def test_same_host_redirect_keeps_credentials(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        assert await origin.read(f"{hostile.url}/redirect-same", {"Authorization": BASIC}, 5, 5) == SMALL[5:10]
    assert hostile.seen("/file")[0].headers["authorization"] == BASIC


async def test_expired_redirect_is_renewed(hostile: Hostile) -> None:
    url = f"{hostile.url}/rotating"
    async with fast_origin() as origin:
        assert await origin.read(url, {}, 0, 10) == SMALL[:10]
        assert await origin.read(url, {}, 10, 10) == SMALL[10:20]  # /once/1 was remembered
        assert await origin.read(url, {}, 20, 10) == SMALL[20:30]  # /once/1 refuses, /once/2 serves
    paths = [r.path for r in hostile.requests]
    assert paths == ["/rotating", "/once/1", "/once/1", "/once/1", "/rotating", "/once/2"]


async def test_redirect_loop_is_bounded(hostile: Hostile) -> None:
    async with fast_origin(max_redirects=3) as origin:
        with pytest.raises(OriginError, match=r"redirected more than 3 times"):
            await origin.read(f"{hostile.url}/loop", {}, 0, 1)
    assert len(hostile.seen("/loop")) == 4


async def test_bearer_challenge_with_basic_credentials(hostile: Hostile) -> None:
    url = f"{hostile.url}/v2/private/blobs/sha256:abc"
    async with fast_origin() as origin:
        assert (await origin.stat(url, {"Authorization": BASIC})).content_length == len(SMALL)
        for offset in (0, 1000, 2000):
            assert await origin.read(url, {"Authorization": BASIC}, offset, 1000) == SMALL[offset : offset + 1000]
    tokens = hostile.seen("/token")
    assert len(tokens) == 1  # cached for later requests
    assert tokens[0].headers["authorization"] == BASIC
    assert tokens[0].query == {"service": ["hostile"], "scope": ["repository:private:pull"]}
    blob = hostile.seen(url.removeprefix(hostile.url)) + hostile.seen(url.removeprefix(hostile.url), "HEAD")
    assert len(blob) == 5  # one 401, then HEAD and three GETs with the token
    assert sum(r.headers.get("authorization") == f"Bearer {USER_TOKEN}" for r in blob) == 4


async def test_bearer_challenge_anonymous(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        assert await origin.read(f"{hostile.url}/v2/public/blobs/sha256:abc", {}, 3, 4) == SMALL[3:7]
    assert "authorization" not in hostile.seen("/token")[0].headers


@pytest.mark.parametrize("authorization", [WRONG_BASIC, None, "Bearer stale"])
async def test_bearer_refusal_keeps_the_origin_answer(hostile: Hostile, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with fast_origin() as origin:
        with pytest.raises(OriginError, match="401") as caught:
            await origin.read(f"{hostile.url}/v2/private/blobs/sha256:abc", headers, 0, 10)
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert caught.value.headers["www-authenticate"].startswith(f'Bearer realm="{hostile.url}/token"')
    assert len(hostile.seen("/token")) == (0 if authorization == "Bearer stale" else 1)
    if authorization == "Bearer stale":  # passed through untouched
        assert hostile.requests[0].headers["authorization"] == "Bearer stale"


async def test_basic_auth_passes_through(hostile: Hostile) -> None:
    async with fast_origin() as origin:
        assert await origin.read(f"{hostile.url}/basic", {"Authorization": BASIC}, 0, 5) == SMALL[:5]
        with pytest.raises(OriginError, match="401") as caught:
            await origin.stat(f"{hostile.url}/basic", {})
    assert caught.value.headers["www-authenticate"] == 'Basic realm="hostile"'


async def test_bandwidth_limit(hostile: Hostile) -> None:
    start = trio.current_time()
    # The attempt deadline does not count time spent waiting for the limiter.
    async with Origin(timeout=1.0, retries=1, limiter=RateLimiter(2_000_000)) as origin:
        assert await origin.read(f"{hostile.url}/big", {}, 0, 8_000_000) == BIG[:8_000_000]
    elapsed = trio.current_time() - start
    assert 3.5 <= elapsed < 10


# --- real registries ----------------------------------------------------------------------------------------


async def _push_blob(registry: RegistryServer) -> tuple[str, bytes]:
    """Push an image with one uncompressed 300 KB layer; its blob URL and bytes."""
    async with registry.client() as client:
        pushed = await push_test_image(
            client, "seed/app", "v1", [make_layer_tar({"data": os.urandom(300_000)})], compression="none"
        )
    digest = pushed.layers[0].digest
    return f"{registry.url}/v2/seed/app/blobs/{digest}", pushed.blobs[digest]


async def _check_blob(origin: Origin, url: str, blob: bytes, headers: dict[str, str]) -> None:
    info = await origin.stat(url, headers)
    assert (info.content_length, info.ranges) == (len(blob), True)
    for offset, length in [(0, 4096), (100_000, 65_536), (len(blob) - 10, 10)]:
        assert await origin.read(url, headers, offset, length) == blob[offset : offset + length]


async def test_registry_anonymous(registry: RegistryServer) -> None:
    url, blob = await _push_blob(registry)
    async with fast_origin() as origin:
        await _check_blob(origin, url, blob, {})


async def test_registry_bearer_token(token_registry: RegistryServer, token_service: TokenService) -> None:
    url, blob = await _push_blob(token_registry)
    token_service.requests.clear()
    async with fast_origin() as origin:
        await _check_blob(origin, url, blob, {"Authorization": BASIC})
        assert token_service.requests == [(USERNAME, ["repository:seed/app:pull"])]
        with pytest.raises(OriginError, match="401") as caught:
            await origin.read(url, {}, 0, 10)  # anonymous users are granted nothing
    assert caught.value.status == 401
    assert caught.value.headers["www-authenticate"].startswith("Bearer realm=")


async def test_registry_basic_auth(auth_registry: RegistryServer) -> None:
    url, blob = await _push_blob(auth_registry)
    async with fast_origin() as origin:
        await _check_blob(origin, url, blob, {"Authorization": BASIC})
        with pytest.raises(OriginError, match="401"):
            await origin.stat(url, {})
