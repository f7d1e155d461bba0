"""Back-to-source client: stat and ranged reads of task content from HTTP(S) servers and OCI registries.

The caller's request headers (``Authorization`` included) go to the origin as given, like Dragonfly's
backend. A registry's bearer challenge is answered with a token fetched with the caller's Basic
credentials (or anonymously), cached per credentials and scope. Temporary redirects (registry to
storage) are remembered per URL and credentials, so per-piece reads go straight to the storage URL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import mmap
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import trio

from lazyfs.errors import LazyfsError
from lazyfs.registry.auth import Authenticator, Credentials, parse_challenges
from lazyfs.registry.errors import RegistryError, UnavailableError
from lazyfs.registry.redirects import RedirectCache
from lazyfs.registry.transport import RetryPolicy, describe, read_capped
from p2p.ratelimit import RateLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")
Attempt = Callable[[trio.CancelScope], Awaitable[T]]

HOP_BY_HOP = frozenset(  # RFC 9110 connection-specific headers (and the old proxy ones): never forwarded
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer"}
    | {"transfer-encoding", "upgrade"}
)
_NOT_FORWARDED = HOP_BY_HOP | {"host", "range", "content-length", "accept-encoding"}
_CREDENTIAL_HEADERS = ("authorization", "cookie")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 403 too: a URL pre-signed for GET (S3, GCS) refuses HEAD.
_HEAD_REFUSED = frozenset({403, 405, 501})
_MAX_TOKEN_BODY = 1 << 20
_MAX_AUTHENTICATORS = 256
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_REGISTRY_PATH_RE = re.compile(r"/v2/(.+)/(?:blobs|manifests)/[^/]+")
Buffer = bytearray | mmap.mmap
RECEIVE_LOWAT = 64 << 10  # wake a body read only once this much has arrived (httpcore reads at most 64 KiB)


@dataclasses.dataclass(frozen=True, slots=True)
class SourceInfo:
    """What :meth:`Origin.stat` learnt: total length, the origin's headers (lowercase names) and Range support."""

    url: str
    content_length: int
    headers: dict[str, str]
    ranges: bool


class OriginError(LazyfsError):
    """The origin failed or refused; *status* and *headers* (lowercase names) are its answer, if it gave one."""

    def __init__(
        self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None, retryable: bool
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.retryable = retryable

    def after(self, attempts: int) -> OriginError:
        """The same failure, saying how many attempts were made."""
        plural = "s" if attempts != 1 else ""
        return OriginError(
            f"{self} after {attempts} attempt{plural}", status=self.status, headers=self.headers, retryable=True
        )


def _socket(response: httpx.Response) -> Any:
    """The response's socket (a trio socket), or None where the transport does not say."""
    stream = response.extensions.get("network_stream")
    return None if stream is None else stream.get_extra_info("socket")


def _receive_lowat(sock: Any, size: int) -> None:
    """Set SO_RCVLOWAT, so slow links give a few large reads instead of one per trickle of bytes (a seed at
    100 Mbit/s measured 9.9 CPU-s per GB moved without it, 6.3 with it)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, size))

class Origin:
    """Fetches from origins with retries, redirects, bearer tokens and an optional bandwidth limit.

    Each attempt must finish within *timeout* seconds (time spent waiting for *limiter* does not count);
    at most *retries* attempts are made, *backoff* seconds apart, doubling, with jitter.
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        limiter: RateLimiter | None = None,
        max_redirects: int = 10,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if timeout <= 0 or retries < 1 or backoff < 0 or max_redirects < 0:
            raise ValueError(f"bad origin settings: {timeout=} {retries=} {backoff=} {max_redirects=}")
        self._timeout = timeout
        self._retry = RetryPolicy(attempts=retries, backoff=backoff, max_delay=max(backoff, timeout))
        self._limiter = limiter
        self._max_redirects = max_redirects
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            verify=verify,
            follow_redirects=False,
            headers={"User-Agent": "lazyfs-seed", "Accept-Encoding": "identity"},
        )
        self._redirects = RedirectCache()
        self._authenticators: OrderedDict[tuple[str, str], Authenticator] = OrderedDict()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceInfo:
        """Length and headers of *url*: HEAD, or a one-byte ranged GET if HEAD is refused or gives no length."""
        forwarded = forwarded_headers(headers)
        return await self._retrying("stat", url, lambda guard: self._stat_once(url, forwarded))

    async def read(self, url: str, headers: Mapping[str, str], offset: int, length: int,
                   into: Buffer | None = None) -> memoryview:
        """Exactly *length* bytes of *url* from *offset*, by a Range request; in *into* (reused by callers that
        read piece after piece: fresh memory costs more than the bytes) if given, else in a new buffer."""
        if offset < 0 or length <= 0:
            raise ValueError(f"bad range for {url}: offset {offset}, length {length}")
        if into is not None and len(into) < length:
            raise ValueError(f"a {len(into)}-byte buffer cannot hold {length} bytes of {url}")
        view = memoryview(bytearray(length) if into is None else into)[:length]
        forwarded = forwarded_headers(headers)
        await self._retrying("read", url, lambda guard: self._read_once(url, forwarded, offset, view, guard))
        return view

    async def stream(self, url: str, headers: Mapping[str, str], length: int) -> AsyncIterator[bytes]:
        """The whole content of an origin that ignores Range, chunk by chunk as it arrives: exactly *length* bytes.

        Only opening the response is retried; a failure mid-body raises OriginError (the caller keeps what it
        stored). Every chunk must come within the timeout.
        """
        forwarded = forwarded_headers(headers)
        received = 0
        async with self._open("GET", url, forwarded, None) as response:
            _require_status(response, url, (200,))
            try:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > length:
                        raise OriginError(f"origin {_redact(url)} sent more than its {length} bytes", retryable=False)
                    if self._limiter is not None:
                        await self._limiter.acquire(len(chunk))
                    yield chunk
            except httpx.TransportError as exc:
                raise OriginError(f"origin {_redact(url)} broke off after {received} of {length} bytes: "
                                  f"{describe(exc)}", retryable=True) from exc
        if received < length:
            raise OriginError(f"origin {_redact(url)} sent {received} of {length} bytes", retryable=True)

    async def _retrying(self, op: str, url: str, attempt: Attempt[T]) -> T:
        """Run *attempt* until it succeeds, fails for good, or the attempts run out."""
        attempts, number = self._retry.attempts, 0
        while True:
            number += 1
            outcome = await self._guarded(url, attempt)
            if not isinstance(outcome, OriginError):
                return outcome
            if not outcome.retryable:
                raise outcome
            if number == attempts:
                raise outcome.after(attempts)
            delay = self._retry.delay(number, outcome.headers.get("retry-after"))
            log.warning(
                "origin retry op=%s url=%s attempt=%d/%d delay=%.2f reason=%r",
                op,
                _redact(url),
                number,
                attempts,
                delay,
                str(outcome),
            )
            await trio.sleep(delay)

    async def _guarded(self, url: str, attempt: Attempt[T]) -> T | OriginError:
        """One attempt within the per-attempt deadline; failures are returned, not raised."""
        with trio.CancelScope(deadline=trio.current_time() + self._timeout) as guard:
            try:
                return await attempt(guard)
            except OriginError as exc:
                return exc
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                return OriginError(f"origin {_redact(url)}: {describe(exc)}", retryable=False)
            except httpx.TransportError as exc:  # an untrusted certificate stays untrusted: not retried
                return OriginError(f"origin {_redact(url)} failed: {describe(exc)}", retryable=not _untrusted(exc))
        return OriginError(f"origin {_redact(url)} gave no complete answer within {self._timeout:g} s", retryable=True)

    async def _stat_once(self, url: str, headers: httpx.Headers) -> SourceInfo:
        """HEAD *url*; fall back to a probe when HEAD is refused or does not settle length and Range support."""
        async with self._open("HEAD", url, headers, None) as response:
            if response.status_code not in _HEAD_REFUSED:
                _require_status(response, url, (200,))
                length = _content_length(response)
                accept = response.headers.get("accept-ranges", "").lower()
                if length is not None and (accept == "none" or "bytes" in accept):
                    return SourceInfo(url, length, _info_headers(response, length), "bytes" in accept)
            log.info("origin probe url=%s head_status=%d", _redact(url), response.status_code)
        return await self._probe(url, headers)

    async def _probe(self, url: str, headers: httpx.Headers) -> SourceInfo:
        """GET the first byte only: the total comes from Content-Range, or Content-Length if Range is ignored."""
        async with self._open("GET", url, headers, "bytes=0-0") as response:  # the body is never read
            status = response.status_code
            _require_status(response, url, (200, 206, 416))
            content_range = response.headers.get("content-range", "")
            total = _content_length(response) if status == 200 else _range_total(content_range)
            if total is None:
                raise OriginError(
                    f"origin {_redact(url)} gave no content length ({status}, Content-Range {content_range!r})",
                    status=status,
                    headers=response.headers,
                    retryable=False,
                )
            return SourceInfo(url, total, _info_headers(response, total), status != 200)

    async def _read_once(
        self, url: str, headers: httpx.Headers, offset: int, view: memoryview, guard: trio.CancelScope
    ) -> None:
        """GET one range into *view*, checked to be exactly that range."""
        async with self._open("GET", url, headers, f"bytes={offset}-{offset + len(view) - 1}") as response:
            _check_range(response, url, offset, len(view))
            await self._read_body(response, url, view, guard)

    async def _read_body(self, response: httpx.Response, url: str, view: memoryview, guard: trio.CancelScope) -> None:
        """Stream exactly ``len(view)`` bytes into *view*, paying the limiter per chunk; never more than that."""
        length = len(view)
        done = 0
        sock = _socket(response)
        try:
            async for chunk in response.aiter_raw():
                if done + len(chunk) > length:
                    raise OriginError(
                        f"origin {_redact(url)} sent more than the {length} bytes asked for", retryable=False
                    )
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
                # the rest of the body is all on the wire now (h11 yields what it buffered): wake for a full read
                _receive_lowat(sock, min(RECEIVE_LOWAT, length - done))
                await self._throttle(len(chunk), guard)
        except httpx.TransportError as exc:
            raise OriginError(
                f"origin {_redact(url)} broke off after {done} of {length} bytes: {describe(exc)}", retryable=True
            ) from exc
        finally:
            _receive_lowat(sock, 1)  # the pooled connection reads its next response's headers normally
        if done < length:
            raise OriginError(f"origin {_redact(url)} sent {done} of {length} bytes", retryable=True)

    async def _throttle(self, amount: int, guard: trio.CancelScope) -> None:
        """Wait for the bandwidth limiter, moving the attempt's deadline by the time waited."""
        if self._limiter is None:
            return
        started = trio.current_time()
        await self._limiter.acquire(amount)
        guard.deadline += trio.current_time() - started

    @asynccontextmanager
    async def _open(
        self, method: str, url: str, headers: httpx.Headers, range_: str | None
    ) -> AsyncIterator[httpx.Response]:
        """Send a request, via the remembered redirect target if there is one; yield the final unread response."""
        origin = httpx.URL(url)
        key = (f"{method} {url}", headers.get("authorization", ""))
        response = None
        if (cached := self._redirects.get(key)) is not None:
            try:
                response = await self._follow(method, cached, origin, headers, range_, key)
            except httpx.TransportError:
                self._redirects.discard(key)
                raise
            if response.status_code >= 400:  # expired or revoked: ask the origin again
                log.info("origin stale-redirect url=%s status=%d", _redact(url), response.status_code)
                self._redirects.discard(key)
                await response.aclose()
                response = None
        if response is None:
            response = await self._follow(method, origin, origin, headers, range_, key)
        try:
            yield response
        finally:
            await response.aclose()

    async def _follow(
        self,
        method: str,
        start: httpx.URL,
        origin: httpx.URL,
        headers: httpx.Headers,
        range_: str | None,
        key: tuple[str, str],
    ) -> httpx.Response:
        """Send from *start*, following up to ``max_redirects`` redirects; remember where a redirect led."""
        target, redirected = start, False
        for hop in range(self._max_redirects + 1):
            response = await self._send_authorized(method, target, origin, headers, range_)
            status = response.status_code
            if status not in _REDIRECT_STATUSES:
                if redirected and status < 300:
                    self._redirects.put(key, target)
                return response
            await response.aclose()
            if hop == self._max_redirects:
                break
            target, redirected = _redirect_target(response, target), True
            log.info("origin redirect url=%s status=%d location=%s", _redact(origin), status, _redact(target))
        raise OriginError(f"origin {_redact(origin)} redirected more than {self._max_redirects} times", retryable=False)

    async def _send_authorized(
        self, method: str, target: httpx.URL, origin: httpx.URL, headers: httpx.Headers, range_: str | None
    ) -> httpx.Response:
        """Send one request; answer a bearer challenge from the caller's own host once, with a token."""
        same_host = _authority(target) == _authority(origin)
        sent = httpx.Headers(headers) if same_host else _without_credentials(headers)
        authenticator = self._authenticator(origin, headers) if same_host else None
        scopes = _registry_scopes(target)
        if authenticator is not None and (bearer := await authenticator.header(scopes)):
            sent["Authorization"] = bearer
        response = await self._send(method, target, sent, range_)
        challenges = response.headers.get_list("www-authenticate")
        if response.status_code != 401 or authenticator is None or not _has_bearer_challenge(challenges):
            return response
        await response.aclose()
        try:
            await authenticator.on_unauthorized(challenges, scopes, f"origin {_redact(target)}")
        except RegistryError as exc:
            raise OriginError(
                f"origin {_redact(target)} answered 401 and no token was granted: {exc}",
                status=401,
                headers=response.headers,
                retryable=isinstance(exc, UnavailableError),
            ) from exc
        if bearer := await authenticator.header(scopes):
            sent["Authorization"] = bearer
        log.info("origin token url=%s scopes=%s", _redact(target), ",".join(scopes) or "-")
        return await self._send(method, target, sent, range_)

    async def _send(self, method: str, target: httpx.URL, headers: httpx.Headers, range_: str | None) -> httpx.Response:
        """One HTTP exchange, response body unread."""
        request = self._client.build_request(method, target, headers=headers)
        if range_ is not None:
            request.headers["Range"] = range_
        return await self._client.send(request, stream=True)

    def _authenticator(self, origin: httpx.URL, headers: httpx.Headers) -> Authenticator | None:
        """The token cache for the caller's credentials at *origin*; None if they are not Basic or absent."""
        authorization = headers.get("authorization", "")
        credentials = None
        if authorization:
            credentials = _basic_credentials(authorization)
            if credentials is None:
                return None  # a bearer token or other scheme is passed through untouched
        key = (_authority(origin), authorization)
        authenticator = self._authenticators.get(key)
        if authenticator is None:
            authenticator = Authenticator(origin.host, credentials, self._fetch_token)
            self._authenticators[key] = authenticator
            if len(self._authenticators) > _MAX_AUTHENTICATORS:
                self._authenticators.popitem(last=False)
        self._authenticators.move_to_end(key)
        return authenticator

    async def _fetch_token(
        self, realm: str, params: list[tuple[str, str]], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """GET a token from *realm* for an authenticator: (status 200, 401 or 403, body)."""
        async with self._client.stream(
            "GET", realm, params=tuple(params), headers=headers, follow_redirects=True
        ) as response:
            status = response.status_code
            if status not in (200, 401, 403):
                raise OriginError(
                    f"token service {_redact(realm)} answered {status} {response.reason_phrase}",
                    status=status,
                    headers=response.headers,
                    retryable=_retryable_status(status),
                )
            return status, await read_capped(response, _MAX_TOKEN_BODY, f"token service {_redact(realm)}")


def _untrusted(exc: BaseException) -> bool:
    """Whether *exc* was caused by a failed certificate verification."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None or isinstance(current, ssl.SSLCertVerificationError):
            return current is not None
        current = current.__cause__ or current.__context__
    return False


def forwarded_headers(headers: Mapping[str, str]) -> httpx.Headers:
    """The caller's headers to send on: without hop-by-hop ones (and those named in Connection), Host,
    Range, Content-Length and Accept-Encoding."""
    connection = ",".join(value for name, value in headers.items() if name.lower() == "connection")
    dropped = _NOT_FORWARDED | {token.strip().lower() for token in connection.split(",")}
    return httpx.Headers({name: value for name, value in headers.items() if name.lower() not in dropped})


def _without_credentials(headers: httpx.Headers) -> httpx.Headers:
    """*headers* minus Authorization and Cookie, for a host other than the one the caller named."""
    return httpx.Headers([(name, value) for name, value in headers.multi_items() if name not in _CREDENTIAL_HEADERS])


def _basic_credentials(authorization: str) -> Credentials | None:
    """The user and password of an ``Authorization: Basic`` value, or None for another scheme."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return Credentials(user, password) if sep else None


def _has_bearer_challenge(challenges: list[str]) -> bool:
    """Whether a ``WWW-Authenticate`` header offers a bearer token realm."""
    return any(c.scheme == "bearer" and "realm" in c.params for c in parse_challenges(challenges))


def _registry_scopes(url: httpx.URL) -> tuple[str, ...]:
    """The pull scope a registry blob or manifest URL needs, so a cached token can be sent up front."""
    match = _REGISTRY_PATH_RE.fullmatch(url.path)
    return (f"repository:{match[1]}:pull",) if match else ()


def _redirect_target(response: httpx.Response, current: httpx.URL) -> httpx.URL:
    """Where a redirect points, resolved against the URL that answered it."""
    location = response.headers.get("location", "")
    try:
        target = current.join(location) if location else None
    except httpx.InvalidURL:
        target = None
    if target is None or target.scheme not in ("http", "https"):
        raise OriginError(
            f"origin {_redact(current)} answered {response.status_code} with an unusable Location {location!r}",
            status=response.status_code,
            headers=response.headers,
            retryable=False,
        )
    return target


def _require_status(response: httpx.Response, url: str, wanted: tuple[int, ...]) -> None:
    """Raise :class:`OriginError` with the origin's status and headers unless the status is *wanted*."""
    status = response.status_code
    if status not in wanted:
        raise OriginError(
            f"origin {_redact(url)} answered {status} {response.reason_phrase}".rstrip(),
            status=status,
            headers=response.headers,
            retryable=_retryable_status(status),
        )


def _check_range(response: httpx.Response, url: str, offset: int, length: int) -> None:
    """Accept a 206 for exactly the range asked for, or a 200 of exactly *length* bytes at offset 0."""
    _require_status(response, url, (200, 206))
    end = offset + length - 1
    declared = _content_length(response)
    if response.status_code == 200 and (offset != 0 or declared not in (None, length)):
        size = "" if declared is None else f" of {declared} bytes"
        problem = f"ignored Range bytes={offset}-{end} and sent the whole content{size}"
    elif declared not in (None, length):
        problem = f"declared {declared} bytes for the {length}-byte range {offset}-{end}"
    elif response.status_code == 206 and not _range_matches(response, offset, end):
        problem = f"answered Content-Range {response.headers.get('content-range')!r} for bytes {offset}-{end}"
    else:
        return
    raise OriginError(
        f"origin {_redact(url)} {problem}", status=response.status_code, headers=response.headers, retryable=False
    )


def _range_matches(response: httpx.Response, first: int, last: int) -> bool:
    """Whether the response's Content-Range covers exactly bytes *first*-*last*."""
    match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
    return match is not None and (int(match[1]), int(match[2])) == (first, last)


def _range_total(content_range: str) -> int | None:
    """The complete length in a Content-Range value (``bytes 0-0/N`` or ``bytes */N``), if known."""
    match = _CONTENT_RANGE_RE.match(content_range)
    total = match[3] if match else (m[1] if (m := _UNSATISFIED_RANGE_RE.match(content_range)) else "*")
    return None if total == "*" else int(total)


def _content_length(response: httpx.Response) -> int | None:
    """The declared Content-Length, if there is a single valid one."""
    value = response.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() else None


def _info_headers(response: httpx.Response, total: int) -> dict[str, str]:
    """The origin's headers describing the whole content: hop-by-hop and range headers dropped."""
    headers = {k: v for k, v in response.headers.items() if k not in HOP_BY_HOP and k != "content-range"}
    headers["content-length"] = str(total)
    return headers


def _retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying: timeouts, throttling and server errors."""
    return status in (408, 429) or status >= 500


def _authority(url: httpx.URL) -> str:
    """Scheme, host and port: credentials never leave the host the caller named."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def _redact(url: str | httpx.URL) -> str:
    """*url* without its query, which may carry signatures."""
    return str(httpx.URL(url).copy_with(query=None))
