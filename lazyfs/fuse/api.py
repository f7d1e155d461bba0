"""A small HTTP/1.1 API served on a unix socket (status, metrics, prefetch, shutdown), as nydusd has.

One request per connection; bodies are capped. Clients use httpx with a unix-socket transport.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
Handler = Callable[[bytes], Awaitable["Reply"]]


@dataclass(frozen=True)
class Reply:
    """An HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Reply:
        """A JSON reply."""
        return cls(status, json.dumps(value).encode())


class ApiServer:
    """Routes ``(METHOD, path)`` to handlers; serve with :meth:`serve`."""

    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes

    async def serve(self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on unix socket *path* (replacing a stale one) until cancelled."""
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            path.unlink(missing_ok=True)

    async def serve_tcp(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """Listen on TCP *host*:*port* (0 picks one, handed to ``task_status``) until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
            try:
                with trio.fail_after(10):
                    request, body = await _read_request(conn, stream)
                reply = await self._dispatch(request, body)
            except (h11.RemoteProtocolError, ValueError) as exc:
                reply = Reply.json({"error": f"bad request: {exc}"}, 400)
            except trio.TooSlowError:
                return
            except Exception as exc:  # a failing handler must not take the daemon down
                log.exception("event=api_error")
                reply = Reply.json({"error": str(exc)}, 500)
            await _send_reply(conn, stream, reply)

    async def _dispatch(self, request: h11.Request, body: bytes) -> Reply:
        method, target = request.method.decode(), request.target.decode().split("?")[0]
        handler = self.routes.get((method, target))
        if handler is None:
            known = {p for _, p in self.routes}
            return Reply.json({"error": f"no route {method} {target}"}, 405 if target in known else 404)
        return await handler(body)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise ValueError("request body too large")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            raise ValueError("connection closed mid-request")


async def _send_reply(conn: h11.Connection, stream: trio.abc.Stream, reply: Reply) -> None:
    headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body))),
               ("connection", "close")]
    try:
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=reply.body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def api_client(socket_path: Path, timeout: float = 10.0) -> httpx.Client:
    """A blocking client for a daemon's API socket (for the CLI)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://lazyfs",
                        timeout=timeout)
