"""The peer's registry mirror and HTTP proxy (Dragonfly dfdaemon's proxy; ../shared/docs/dragonfly-protocol.md §4).

One HTTP/1.1 server (h11 on trio, keep-alive) on ``proxy_port`` serving three kinds of request:

- **Mirror** (origin-form, ``GET /v2/...``, as containerd sends with ``hosts.toml``): the upstream is the
  ``X-Dragonfly-Registry`` header, else containerd's ``?ns=`` query (a bare host means ``https://host``, or
  ``http://host`` when listed in ``proxy_plain_http``), else ``registry_mirror``.
- **Forward proxy** (absolute-form, ``GET http://host/...``): the upstream is the URL itself.
- **CONNECT**: a blind TCP tunnel, unless its ``host:port`` matches ``proxy_intercept_hosts`` (with
  ``proxy_ca_cert``/``proxy_ca_key``): then the proxy answers the TLS handshake itself with a certificate for that
  host signed by the CA (p2p/tls.py) and serves the HTTP/1.1 requests inside (keep-alive) like proxied ones, for
  the upstream ``https://host:port``: blob GETs go P2P, the rest is forwarded over TLS. Origins are verified against
  the system trust store plus ``origin_ca_bundle``.

A GET whose URL (query dropped) matches one of ``proxy_rules`` (default ``blobs/sha256.*``), or that carries
``X-Dragonfly-Use-P2P: true``, is downloaded through the swarm as a ``common.Download`` and streamed to the
client piece by piece as pieces are stored, in order. ``Range: bytes=...`` (one range) gives a 206 and fetches
only the covering pieces. A registry blob's URL names its digest, so the Download carries it and the whole
blob's sha256 is checked before the task is marked complete; the response's last piece is held back until the
download has finished, so a client never receives the complete body of content that failed its check. A task
already complete locally is served from disk after an authorised stat against the origin with the client's
headers (each client's own access check; no body bytes).

Every request header except Host, Range, hop-by-hop headers and ``X-Dragonfly-*`` goes into
``Download.request_header`` (Authorization included: it is used for the stat, back-to-source and the seed's
fetch). Read: ``X-Dragonfly-Tag``, ``-Application``, ``-Priority``, ``-Filtered-Query-Params`` (comma
separated), ``-Piece-Length`` (4 MiB..64 MiB), ``-Content-For-Calculating-Task-ID``,
``-Enable-Task-ID-Based-Blob-Digest``, ``-Use-P2P``, ``-Registry``; ``-Prefetch``, ``-Output-Path`` and
``-Force-Hard-Link`` are ignored. Set: ``X-Dragonfly-Task-ID``, and on errors ``X-Dragonfly-Error-Type``:
``backend`` when the origin refused (its status and headers, e.g. 401 + WWW-Authenticate, reach the client),
``dfdaemon`` when the download failed otherwise (502), ``proxy`` for bad requests or an unreachable upstream.

Everything else (manifests, ``/v2/`` pings, token requests, HEAD, pushes) passes through unchanged, bodies
streamed both ways, hop-by-hop headers dropped. One failing client never takes the daemon down.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import h11
import httpx
import trio

from lazyfs.registry.transport import describe
from p2p.api import common
from p2p.config import PeerConfig
from p2p.direct_io import ALIGN, aligned_buffer, read_into
from p2p.download import Downloader, DownloadError, Job, download_task_id
from p2p.pieces import MAX_PIECE_LENGTH, MIN_PIECE_LENGTH
from p2p.storage import SUCCEEDED, Storage, StorageError
from p2p.tls import TLSConfigError, interceptor, leaf_host, origin_context
from seed.origin import HOP_BY_HOP, OriginError

log = logging.getLogger("lazyfs.proxy")

MAX_HEAD = 64 << 10  # request line and headers
MAX_DRAINED = 1 << 20  # body of a request we answer ourselves
SEND_CHUNK = 1 << 20
CONNECT_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 30.0  # a client's TLS handshake in an intercepted tunnel
_BLOB_DIGEST = re.compile(r"/v2/.+/blobs/(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND", 416: "RANGE_INVALID", 429: "TOOMANYREQUESTS"}

Headers = list[tuple[str, str]]


class ProxyError(Exception):
    """A request the proxy answers itself with *status*; *error_type* goes in ``X-Dragonfly-Error-Type``."""

    def __init__(self, status: int, message: str, error_type: str = "proxy",
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = list(headers)


class Unsatisfiable(Exception):
    """A Range outside the content."""


class _Closed(Exception):
    """The client went away, or the connection must end (a response was cut short)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One ``bytes=`` range: *first*-*last* (either may be None: ``a-`` or the suffix ``-n``)."""

    first: int | None
    last: int | None

    def resolve(self, length: int) -> tuple[int, int]:
        """Inclusive ``(start, end)`` within *length* bytes; Unsatisfiable if none of it is."""
        if self.first is None:
            assert self.last is not None
            if self.last == 0 or length == 0:
                raise Unsatisfiable
            return max(length - self.last, 0), length - 1
        if self.first >= length:
            raise Unsatisfiable
        end = length - 1 if self.last is None else min(self.last, length - 1)
        return self.first, end


def parse_range(value: str | None) -> ByteRange | None:
    """The single byte range of a Range header; None when absent, multiple or malformed (served whole, as
    RFC 9110 allows a server to ignore Range)."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip().replace(" ", ""))
    if match is None or not (match[1] or match[2]):
        return None
    first, last = (int(match[1]) if match[1] else None), (int(match[2]) if match[2] else None)
    if first is not None and last is not None and last < first:
        return None
    return ByteRange(first, last)


def end_to_end(headers: Iterable[tuple[str, str]]) -> Headers:
    """*headers* without hop-by-hop ones and those the Connection header names (lowercase names expected)."""
    headers = list(headers)
    named = {token.strip().lower() for name, value in headers if name == "connection" for token in value.split(",")}
    return [(name, value) for name, value in headers if name not in HOP_BY_HOP and name not in named]


def _get(headers: Headers, name: str) -> str | None:
    values = [value for key, value in headers if key == name]
    return ", ".join(values) if values else None


def _authority_url(text: str, plain_http: Iterable[str]) -> str:
    """``scheme://host[:port]`` from a URL, or from a bare host (https unless listed in *plain_http*)."""
    text = text.strip()
    if "://" not in text:
        host = text.rstrip("/")
        scheme = "http" if host in plain_http or host.split(":")[0] in plain_http else "https"
        text = f"{scheme}://{host}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProxyError(400, f"bad upstream {text!r}")
    return f"{parts.scheme}://{parts.netloc}"


class Proxy:
    """The mirror/proxy server; :meth:`serve` runs it."""

    def __init__(self, config: PeerConfig, downloader: Downloader, storage: Storage) -> None:
        self.config = config
        self.downloader = downloader
        self.storage = storage
        self.rules = [re.compile(rule) for rule in config.proxy_rules]
        self.timeout = config.proxy_timeout
        self.interceptor = interceptor(config)
        self.client: httpx.AsyncClient | None = None
        self.counters = {"proxy_requests": 0, "proxy_p2p_requests": 0, "proxy_p2p_bytes": 0,
                         "proxy_direct_requests": 0, "proxy_errors": 0, "proxy_tunnels": 0,
                         "proxy_intercepted_tunnels": 0, "proxy_tls_handshake_errors": 0}

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen on *host*:*port* (0 picks one, handed to ``task_status``) until cancelled."""
        timeout = httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                     verify=origin_context(self.config.origin_ca_bundle)) as client:
            for default in ("accept", "accept-encoding", "user-agent"):  # pass the client's own, or none
                del client.headers[default]
            self.client = client
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound: int = listeners[0].socket.getsockname()[1]
            log.info("proxy listening address=%s:%d", host, bound)
            task_status.started(bound)
            await trio.serve_listeners(self._connection, listeners)

    # --- connections ------------------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_connection(stream)
        except Exception:  # nothing a client does may take the daemon down
            log.exception("proxy connection failed")

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            await self._serve_http(stream, None)

    async def _serve_http(self, stream: trio.abc.Stream, tunnel: str | None) -> None:
        """Answer requests on *stream* until it closes: the client's own connection, or the inside of an
        intercepted tunnel to *tunnel* (an ``https://`` authority)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                with trio.move_on_after(self.timeout):
                    event = await self._next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return  # closed, idle too long, or garbage
                if not await self._exchange(conn, stream, event, tunnel):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if tunnel is not None:
                log.info("proxy bad request in tunnel host=%s error=%s", tunnel, exc)
            await self._bad_request(conn, stream, exc)
        except (_Closed, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away or stalled mid-request
        except Exception:  # one bad exchange must not take the daemon down
            log.exception("proxy connection failed")

    async def _bad_request(self, conn: h11.Connection, stream: trio.abc.Stream, exc: h11.RemoteProtocolError
                           ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"bad request: {exc}\n".encode()
        try:
            await _send(stream, conn, h11.Response(status_code=exc.error_status_hint, headers=[
                ("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close"),
                ("x-dragonfly-error-type", "proxy")]))
            await _send(stream, conn, h11.Data(data=body))
            await _send(stream, conn, h11.EndOfMessage())
        except (_Closed, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(bytes(await stream.receive_some(65536)))

    async def _drain(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        """Read (and drop) the rest of the request, so the connection can be kept."""
        received = 0
        with trio.fail_after(self.timeout):
            while conn.their_state is h11.SEND_BODY:
                event = await self._next_event(conn, stream)
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if received > MAX_DRAINED:
                        raise ProxyError(413, "request body too large")
                elif isinstance(event, h11.ConnectionClosed):
                    raise _Closed

    async def _body(self, conn: h11.Connection, stream: trio.abc.Stream) -> AsyncIterator[bytes]:
        """The request body as it arrives, for the upstream."""
        while conn.their_state is h11.SEND_BODY:
            with trio.fail_after(self.timeout):
                event = await self._next_event(conn, stream)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Closed

    async def _exchange(self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request,
                        tunnel: str | None) -> bool:
        """Answer one request (inside an intercepted tunnel to *tunnel*, if given); False when the connection must
        close."""
        self.counters["proxy_requests"] += 1
        method = request.method.decode("ascii", "replace").upper()
        target = request.target.decode("latin-1")
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in request.headers]
        try:
            if method == "CONNECT" and tunnel is None:
                await self._tunnel(conn, stream, target)
                return False
            url = self._upstream_url(target, headers, tunnel)
            if method == "GET" and self._p2p(url, headers):
                self.counters["proxy_p2p_requests"] += 1
                await self._drain(conn, stream)
                return await self._via_p2p(conn, stream, url, headers)
            self.counters["proxy_direct_requests"] += 1
            return await self._forward(conn, stream, method, url, headers)
        except ProxyError as exc:
            self.counters["proxy_errors"] += 1
            shown = _redact(f"https://{tunnel}{target}" if tunnel is not None else target)
            log.info("proxy refused method=%s target=%s status=%d error=%s", method, shown, exc.status, exc)
            if conn.our_state is not h11.SEND_RESPONSE:
                return False  # the response had begun: cut it short
            await _reply(stream, conn, exc.status, [*exc.headers, ("x-dragonfly-error-type", exc.error_type)],
                         _error_body(exc.status, str(exc)), close=conn.their_state is not h11.DONE)
            return True

    def _upstream_url(self, target: str, headers: Headers, tunnel: str | None) -> str:
        """The absolute URL a request is for."""
        if tunnel is not None:
            if not target.startswith("/"):
                raise ProxyError(400, f"only origin-form requests inside a tunnel to {tunnel}, not {_redact(target)!r}")
            return f"https://{tunnel}{target}"
        if target.startswith("/"):
            registry = _get(headers, "x-dragonfly-registry")
            if registry:
                base = _authority_url(registry, self.config.proxy_plain_http)
            elif ns := dict(parse_qsl(urlsplit(target).query)).get("ns"):
                base = (self.config.registry_mirror if ns == "docker.io"
                        else _authority_url(ns, self.config.proxy_plain_http))
            else:
                base = self.config.registry_mirror
            return _authority_url(base, ()) + target
        parts = urlsplit(target)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ProxyError(400, f"cannot proxy {_redact(target)!r}")
        return target

    def _p2p(self, url: str, headers: Headers) -> bool:
        if (_get(headers, "x-dragonfly-use-p2p") or "").strip().lower() == "true":
            return True
        parts = urlsplit(url)
        bare = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return any(rule.search(bare) for rule in self.rules)

    # --- P2P ----------------------------------------------------------------------------------------------

    def _download(self, url: str, headers: Headers) -> common.Download:
        """The Download for a P2P request, from its URL and headers."""
        forwarded = [(n, v) for n, v in end_to_end(headers) if n not in ("host", "range", "expect")
                     and not n.startswith("x-dragonfly-")]
        request_header: dict[str, str] = {}
        for name, value in forwarded:
            request_header[name] = f"{request_header[name]}, {value}" if name in request_header else value
        download = common.Download(url=url, type=common.STANDARD, request_header=request_header,
                                   priority=common.LEVEL0)
        if match := _BLOB_DIGEST.search(urlsplit(url).path):
            download.digest = match[1]
        for name in ("tag", "application"):
            if text := _get(headers, f"x-dragonfly-{name}"):
                setattr(download, name, text)
        if text := _get(headers, "x-dragonfly-priority"):
            if not text.strip().isdigit() or int(text) not in common.Priority.values():
                raise ProxyError(400, f"bad X-Dragonfly-Priority {text!r}")
            download.priority = int(text)  # type: ignore[assignment]
        if text := _get(headers, "x-dragonfly-filtered-query-params"):
            download.filtered_query_params.extend(p.strip() for p in text.split(",") if p.strip())
        if text := _get(headers, "x-dragonfly-piece-length"):
            if not text.strip().isdigit() or not MIN_PIECE_LENGTH <= int(text) <= MAX_PIECE_LENGTH:
                raise ProxyError(400, f"X-Dragonfly-Piece-Length {text!r} is not 4 MiB..64 MiB")
            download.piece_length = int(text)
        if text := _get(headers, "x-dragonfly-content-for-calculating-task-id"):
            download.content_for_calculating_task_id = text
        by_digest = (_get(headers, "x-dragonfly-enable-task-id-based-blob-digest") or "").strip().lower()
        download.enable_task_id_based_blob_digest = (by_digest == "true" if by_digest
                                                     else self.config.registry_mirror_blob_digest_task_id)
        return download

    async def _via_p2p(self, conn: h11.Connection, stream: trio.abc.Stream, url: str, headers: Headers) -> bool:
        download = self._download(url, headers)
        tid = download_task_id(download)
        wanted = parse_range(_get(headers, "range"))
        local = self.storage.task(tid)
        length: int | None = None
        try:
            if local is not None and local.state == SUCCEEDED:
                await self.downloader.origin.stat(url, download.request_header)  # this client's access check
                length = local.content_length
            elif wanted is not None:
                length = (await self.downloader.origin.stat(url, download.request_header)).content_length
        except OriginError as exc:
            raise _backend_error(exc) from exc
        span: tuple[int, int] | None = None
        if wanted is not None:
            assert length is not None
            try:
                span = wanted.resolve(length)
            except Unsatisfiable:
                raise ProxyError(416, f"range not satisfiable for {length} bytes",
                                 headers=[("content-range", f"bytes */{length}")]) from None
            if span != (0, length - 1):
                download.range.start, download.range.length = span[0], span[1] - span[0] + 1
        try:
            job = await self.downloader.start(download)
        except DownloadError as exc:
            if exc.origin is not None and exc.origin.status is not None:
                raise _backend_error(exc.origin) from exc
            raise ProxyError(502, f"download failed: {exc}", "dfdaemon") from exc
        info = job.info
        assert info is not None
        if length is not None and info.content_length != length:
            raise ProxyError(502, f"the origin's length changed ({length} -> {info.content_length} bytes)", "dfdaemon")
        start, end = span if span is not None else (0, info.content_length - 1)
        out = [("content-type", "application/octet-stream"), ("content-length", str(end - start + 1)),
               ("accept-ranges", "bytes"), ("x-dragonfly-task-id", tid)]
        if download.HasField("digest"):
            out.append(("docker-content-digest", download.digest))
        if span is not None:
            out.append(("content-range", f"bytes {start}-{end}/{info.content_length}"))
        await _send(stream, conn, h11.Response(status_code=206 if span is not None else 200, headers=out))
        try:
            await self._stream_pieces(conn, stream, job, start, end)
        except (StorageError, DownloadError) as exc:
            log.warning("proxy response cut short task=%s url=%s error=%s", tid, _redact(url), exc)
            return False
        await _send(stream, conn, h11.EndOfMessage())
        return True

    async def _stream_pieces(self, conn: h11.Connection, stream: trio.abc.Stream, job: Job, start: int,
                             end: int) -> None:
        """Send bytes *start*..*end* of the task in order, each piece once it is stored; the last one only after
        the download finished (and passed its digest check)."""
        info = job.info
        assert info is not None
        if end < start:  # empty content
            await self._finished(job)
            return
        length = info.piece_length
        first, last = start // length, end // length
        arrived: set[int] = set()
        following = first
        buffer = aligned_buffer(SEND_CHUNK + 2 * ALIGN)  # reused chunk after chunk
        with self.storage.content_fd(job.task_id, direct=True) as fd:
            # A failed download marks its task failed (or deletes it on a digest mismatch): watch then raises.
            async for piece in self.storage.watch(job.task_id, range(first, last + 1)):
                arrived.add(piece.number)
                while following in arrived:
                    if following == last:
                        await self._finished(job)
                    offset = following * length
                    await self._send_file(conn, stream, fd, buffer, max(start, offset),
                                          min(end + 1, offset + length))
                    following += 1

    @staticmethod
    async def _finished(job: Job) -> None:
        await job.done.wait()
        if job.error:
            raise DownloadError(job.error)

    async def _send_file(self, conn: h11.Connection, stream: trio.abc.Stream, fd: int, buffer: mmap.mmap,
                         offset: int, end: int) -> None:
        """Bytes *offset*..*end* of the content, read past the page cache into *buffer*, as body data."""
        while offset < end:
            data = await trio.to_thread.run_sync(read_into, fd, buffer, offset, min(SEND_CHUNK, end - offset))
            if not data:
                raise StorageError(f"content file ends at {offset}")
            try:
                # h11 only measures the data and hands it back (passthrough): the buffer's view needs no copy
                for part in conn.send_with_data_passthrough(h11.Data(data=cast(bytes, data))) or ():
                    await stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed from None
            offset += len(data)
            self.counters["proxy_p2p_bytes"] += len(data)

    # --- pass-through ---------------------------------------------------------------------------------------

    async def _forward(self, conn: h11.Connection, stream: trio.abc.Stream, method: str, url: str,
                       headers: Headers) -> bool:
        assert self.client is not None
        sent = [(n, v) for n, v in end_to_end(headers) if n not in ("host", "expect")
                and not n.startswith("x-dragonfly-")]
        content = self._body(conn, stream) if conn.their_state is h11.SEND_BODY else None
        request = self.client.build_request(method, url, headers=sent, content=content)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ProxyError(502, f"upstream {_redact(url)} failed: {describe(exc)}") from exc
        try:
            kept = {n for n, _ in end_to_end((n, v) for n, v in response.headers.multi_items())}
            out = [(n, v) for n, v in response.headers.raw if n.decode("latin-1").lower() in kept]
            await _send(stream, conn, h11.Response(status_code=response.status_code, headers=out,
                                                   reason=response.reason_phrase.encode("latin-1", "replace")))
            try:
                async for chunk in response.aiter_raw():
                    await _send(stream, conn, h11.Data(data=chunk))
            except httpx.HTTPError as exc:
                log.warning("proxy upstream broke off url=%s error=%r", _redact(url), exc)
                return False
            await _send(stream, conn, h11.EndOfMessage())
        finally:
            await response.aclose()
        return conn.their_state is not h11.SEND_BODY  # else the upstream answered before reading the whole body

    async def _tunnel(self, conn: h11.Connection, stream: trio.abc.Stream, target: str) -> None:
        """CONNECT host:port: intercepted if the host is listed, else a blind tunnel."""
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProxyError(400, f"bad CONNECT target {target!r}")
        if self.interceptor is not None and self.interceptor.intercepts(target.lower()):
            await self._intercept(conn, stream, host, int(port))
            return
        self.counters["proxy_tunnels"] += 1
        await self._drain(conn, stream)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await trio.open_tcp_stream(host, int(port))
        except (OSError, trio.TooSlowError) as exc:
            raise ProxyError(502, f"cannot reach {target}: {exc}") from exc
        async with upstream:
            await _send(stream, conn, h11.Response(status_code=200, headers=[], reason=b"Connection established"))
            leftover, _ = conn.trailing_data
            if leftover:
                await upstream.send_all(bytes(leftover))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, stream, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, stream, nursery.cancel_scope)


    async def _intercept(self, conn: h11.Connection, stream: trio.abc.Stream, host: str, port: int) -> None:
        """Answer the TLS handshake inside the tunnel as *host*, then serve the requests that come through it."""
        assert self.interceptor is not None
        name = leaf_host(host)
        if name is None:
            raise ProxyError(400, f"cannot intercept {host!r}: not a DNS name or IP address")
        await self._drain(conn, stream)
        try:
            context = await self.interceptor.context(name)
        except TLSConfigError as exc:
            raise ProxyError(500, f"cannot intercept {name}: {exc}", "dfdaemon") from exc
        authority = _authority(name, port)
        await _send(stream, conn, h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        leftover, _ = conn.trailing_data
        transport = _Replayed(stream, bytes(leftover)) if leftover else stream
        tls = trio.SSLStream(transport, context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.counters["proxy_tls_handshake_errors"] += 1
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc.__cause__ or exc)
            log.warning("proxy TLS handshake failed host=%s error=%s", authority, reason)
            return
        self.counters["proxy_intercepted_tunnels"] += 1
        async with tls:
            await self._serve_http(tls, authority)


class _Replayed(trio.abc.Stream):
    """*stream*, after bytes of it that were already received (sent with the CONNECT request)."""

    def __init__(self, stream: trio.abc.Stream, received: bytes) -> None:
        self.stream = stream
        self.received = received

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.received:
            size = len(self.received) if max_bytes is None else max_bytes
            data, self.received = self.received[:size], self.received[size:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _authority(host: str, port: int) -> str:
    """``host[:port]`` for an ``https://`` URL (IPv6 in brackets, no default port, as task ids expect)."""
    name = f"[{host}]" if ":" in host else host
    return name if port == 443 else f"{name}:{port}"


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Closed from None


async def _reply(stream: trio.abc.Stream, conn: h11.Connection, status: int, headers: Headers, body: bytes, *,
                 close: bool = False) -> None:
    out = [*headers, ("content-type", "application/json"), ("content-length", str(len(body)))]
    if close:
        out.append(("connection", "close"))
    await _send(stream, conn, h11.Response(status_code=status, headers=out))
    await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


def _backend_error(exc: OriginError) -> ProxyError:
    """The origin's refusal, passed on: its status and headers (minus framing ones), error type backend."""
    status = exc.status if exc.status is not None and exc.status >= 400 else 502
    dropped = HOP_BY_HOP | {"content-length", "content-encoding", "content-type", "content-range"}
    headers = [(name, value) for name, value in exc.headers.items() if name.lower() not in dropped]
    return ProxyError(status, str(exc), "backend", headers)


def _error_body(status: int, message: str) -> bytes:
    """A registry-style error document."""
    code = _ERROR_CODES.get(status, "UNKNOWN")
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode() + b"\n"


def _redact(url: str) -> str:
    """*url* without its query, which may carry signatures."""
    return url.split("?", 1)[0]
