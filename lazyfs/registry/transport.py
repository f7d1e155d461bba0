"""HTTP policy for registry requests: authentication, retries with backoff, redirects, limits, errors."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Container, Mapping
from contextlib import asynccontextmanager

import httpx
import trio

from lazyfs.registry.auth import Authenticator, Credentials
from lazyfs.registry.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    RegistryDigestMismatch,
    RegistryError,
    UnavailableError,
)

_MAX_ERROR_BODY = 4096
_MAX_TOKEN_BODY = 1 << 20
_MAX_REDIRECTS = 5


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry 429, 5xx and network failures."""

    attempts: int = 5
    backoff: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed *attempt* (1-based); Retry-After wins but is capped."""
        hinted = _parse_retry_after(retry_after) if retry_after else None
        if hinted is not None:
            return min(hinted, self.max_delay)
        return min(self.backoff * 2.0 ** (attempt - 1), self.max_delay) * random.uniform(0.5, 1.0)


def _parse_retry_after(value: str) -> float | None:
    """Retry-After as delta-seconds or an HTTP date, in seconds from now."""
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole response body, refusing more than *limit* bytes."""
    if response.request.method == "HEAD":
        return b""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ProtocolError(f"{what}: response of {length} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise ProtocolError(f"{what}: response exceeds the {limit}-byte limit")
    except httpx.TransportError as exc:
        raise UnavailableError(f"{what}: connection failed while reading the response: {describe(exc)}") from exc
    return bytes(body)


@dataclasses.dataclass(frozen=True)
class Call:
    """One registry request: what it is for, the token scopes it needs and the statuses it accepts.

    Only idempotent calls are retried after 5xx answers or broken connections; *attempts* overrides
    the retry policy's number of tries.
    """

    method: str
    url: str | httpx.URL
    what: str
    scopes: tuple[str, ...]
    ok: Container[int] = (200,)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    content: bytes | AsyncIterable[bytes] | None = None
    idempotent: bool = True
    authenticate: bool = True
    attempts: int | None = None

    @property
    def label(self) -> str:
        """``what: METHOD url`` (without the query, which may hold upload state or signatures)."""
        return f"{self.what}: {self.method} {httpx.URL(self.url).copy_with(query=None)}"


class Transport:
    """Sends registry requests with auth, retries and error mapping; owns the HTTP connection pool."""

    def __init__(
        self,
        registry_host: str,
        credentials: Credentials | None,
        *,
        plain_http: bool,
        timeout: float,
        retry: RetryPolicy,
        verify: ssl.SSLContext | bool,
        mirror: str | None = None,
    ) -> None:
        self.upstream = f"{'http' if plain_http else 'https'}://{registry_host}"
        """The registry itself (``scheme://host[:port]``), also when requests go through a mirror."""
        self.base_url = mirror.rstrip("/") if mirror else self.upstream
        self._mirror = httpx.URL(self.base_url) if mirror else None
        self._plain_http = plain_http
        self._retry = retry
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            verify=verify,
            follow_redirects=True,
            max_redirects=_MAX_REDIRECTS,
            headers={"User-Agent": "lazyfs", "Accept-Encoding": "identity"},
            event_hooks={"request": [self._check_scheme]},
        )
        self.auth = Authenticator(registry_host, credentials, self._fetch_token)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._http.aclose()

    def _to_mirror(self, url: httpx.URL) -> bool:
        """Whether *url* goes to the mirror (a Dragonfly-style registry mirror, e.g. the local lazyfs peer)."""
        mirror = self._mirror
        return mirror is not None and (url.scheme, url.host, url.port) == (mirror.scheme, mirror.host, mirror.port)

    async def _check_scheme(self, request: httpx.Request) -> None:
        """Refuse plain HTTP (redirect targets and token realms included) unless it was asked for (or is the
        mirror's)."""
        if request.url.scheme != "https" and not self._plain_http and not self._to_mirror(request.url):
            raise ProtocolError(f"refusing plain-HTTP request to {request.url} (plain_http is off)")

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[httpx.Response]:
        """Send *call* and yield its unread response, whose status is one of ``call.ok``."""
        response = await self._send(call)
        try:
            yield response
        finally:
            await response.aclose()

    async def request(self, call: Call, limit: int = _MAX_ERROR_BODY) -> tuple[httpx.Response, bytes]:
        """Send *call* and read its body of at most *limit* bytes."""
        async with self.stream(call) as response:
            return response, await read_capped(response, limit, call.what)

    async def _send(self, call: Call) -> httpx.Response:
        """The retry loop: one extra try after a 401 challenge, backoff on 429, 5xx and network errors."""
        attempt, auth_retried = 0, False
        while True:
            attempt += 1
            response = await self._attempt(call, attempt)
            if response is None:
                continue
            status = response.status_code
            if status in call.ok:
                return response
            if status == 401 and call.authenticate and not auth_retried:
                auth_retried, attempt = True, attempt - 1
                challenges = response.headers.get_list("www-authenticate")
                await response.aclose()
                await self.auth.on_unauthorized(challenges, call.scopes, call.label)
                continue
            retryable = status == 429 or (status >= 500 and call.idempotent)
            if not retryable or attempt >= self._attempts(call):
                raise await self._error(response, call, attempt)
            delay = self._retry.delay(attempt, response.headers.get("retry-after"))
            await response.aclose()
            await trio.sleep(delay)

    async def _attempt(self, call: Call, attempt: int) -> httpx.Response | None:
        """Send once; None after a network error worth retrying (having waited out the backoff)."""
        request = self._http.build_request(call.method, call.url, headers=call.headers, content=call.content)
        if self._to_mirror(request.url):
            request.headers["X-Dragonfly-Registry"] = self.upstream  # the mirror's upstream
        authorization = await self.auth.header(call.scopes) if call.authenticate else None
        if authorization:
            request.headers["Authorization"] = authorization
        try:
            return await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            # A refused connection never reached the server, so even a non-idempotent call may be retried.
            if (call.idempotent or isinstance(exc, httpx.ConnectError)) and attempt < self._attempts(call):
                await trio.sleep(self._retry.delay(attempt))
                return None
            raise UnavailableError(f"{call.label} failed: {describe(exc)}") from exc
        except httpx.TooManyRedirects as exc:
            raise ProtocolError(f"{call.label}: too many redirects") from exc

    def _attempts(self, call: Call) -> int:
        """How many times *call* may be tried."""
        return call.attempts or self._retry.attempts

    async def _error(self, response: httpx.Response, call: Call, attempts: int) -> RegistryError:
        """The exception for an unwanted status, with the registry's own error text if it sent one."""
        try:
            body = await read_capped(response, _MAX_ERROR_BODY, call.what)
        except RegistryError:
            body = b""
        finally:
            await response.aclose()
        code = response.status_code
        status = f"{call.label}: {code} {response.reason_phrase}".strip()
        detail = _error_detail(body)
        suffix = f" ({detail})" if detail else ""
        if code == 401:
            hint = self.auth.missing_login() if self.auth.credentials is None else "credentials refused"
            return AuthError(f"{status}: {hint}{suffix}")
        if code == 403:
            return AuthError(f"{status}: access denied{suffix}")
        if code == 404:
            return NotFoundError(f"{status}{suffix}")
        if code == 429 or code >= 500:
            return UnavailableError(f"{status} after {attempts} attempt(s){suffix}")
        if detail.startswith("DIGEST_INVALID:"):
            return RegistryDigestMismatch(f"{status}: the registry computed a different digest{suffix}")
        return ProtocolError(f"{status}: unexpected status{suffix}")

    async def _fetch_token(self, url: str, params: list[tuple[str, str]], headers: dict[str, str]) -> tuple[int, bytes]:
        """GET from a token service on behalf of the authenticator."""
        full = httpx.URL(url).copy_merge_params(tuple(params))
        call = Call("GET", full, f"token for {self.auth.registry}", (), (200, 401, 403), headers, authenticate=False)
        response, body = await self.request(call, _MAX_TOKEN_BODY)
        return response.status_code, body


def describe(exc: BaseException) -> str:
    """A one-line account of a network failure and what caused it (httpx messages are often empty)."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 4:
        parts.append(f"{type(current).__name__}: {current}" if str(current) else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(dict.fromkeys(parts))


def _error_detail(body: bytes) -> str:
    """``CODE: message`` from a registry error body, or a printable excerpt of the body."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return f"{first.get('code', '')}: {first.get('message', '')}"[:300]
    except (ValueError, AttributeError, IndexError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()
