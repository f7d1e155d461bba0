"""The one bridge between grpcio, which runs on threads, and trio, the runtime of every lazyfs process.

Servers: grpcio's thread-pool server with ``grpc.health.v1`` always registered (Dragonfly peers and
schedulers health-check each other with ``Health/Check`` on service ``""``). Handlers that need the
trio loop go through a :class:`Portal`. Clients: unary calls, server streams and bidirectional streams
awaited from trio, each blocking grpcio call parked on a worker thread and cancelled with its trio scope.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import trio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

T = TypeVar("T")

MAX_MESSAGE_BYTES = 16 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
_THREADS = trio.CapacityLimiter(512)  # blocking grpcio calls parked at once, per process
_END = object()


def serve(address: str, register: Callable[[grpc.Server], None], *, workers: int = 128) -> tuple[grpc.Server, int]:
    """Start a server on *address* (``host:port``, port 0 picks one, or ``unix:PATH``) with health serving.

    Returns the started server and its bound port (0 for unix sockets).
    """
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(workers, "grpc"), options=OPTIONS,
                         maximum_concurrent_rpcs=workers * 4)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    register(server)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


def channel(target: str) -> grpc.Channel:
    """A client channel to *target* with lazyfs's message size caps."""
    return grpc.insecure_channel(target, options=OPTIONS)


class ChannelPool:
    """One client channel per target, reused across calls; closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, target: str) -> grpc.Channel:
        """The channel to *target*, opened on first use."""
        if target not in self._channels:
            self._channels[target] = channel(target)
        return self._channels[target]

    def close(self) -> None:
        """Close every channel."""
        for chan in self._channels.values():
            chan.close()
        self._channels.clear()


def healthy(target: str, timeout: float = 2.0) -> bool:
    """Whether the server at *target* answers ``Health/Check`` with SERVING (a blocking call)."""
    with channel(target) as chan:
        try:
            reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def serving(chan: grpc.Channel, timeout: float = 2.0) -> bool:
    """Whether the server behind *chan* answers ``Health/Check`` with SERVING (awaited from trio)."""
    stub = health_pb2_grpc.HealthStub(chan)
    try:
        reply = await unary(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class StreamAborted(Exception):
    """A server stream's source was cancelled before it finished; handlers answer UNAVAILABLE."""


class Portal:
    """Lets grpcio handler threads run code in this process's trio loop.

    Made inside the loop; *nursery* hosts the tasks that feed server streams.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` in the loop and return its result (from a handler thread)."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in the loop and return its result (from a handler thread)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def iterate(self, source: Callable[[], AsyncIterator[T]], context: grpc.ServicerContext) -> Iterator[T]:
        """The items of the trio async iterator ``source()``, for a server-streaming handler.

        The iterator's exceptions are raised here; it is cancelled when the RPC ends (client gone).
        """
        send, receive = trio.open_memory_channel[T](0)  # loop-independent objects until used
        scope = trio.CancelScope()
        failure: list[BaseException] = []
        completed = False

        async def pump() -> None:
            nonlocal completed
            async with send:
                with scope:
                    try:
                        async for item in source():
                            await send.send(item)
                        completed = True
                    except Exception as exc:  # handed to the handler thread, which raises it
                        failure.append(exc)

        self.run_sync(self._nursery.start_soon, pump)
        context.add_callback(lambda: self._cancel(scope))
        try:
            while True:
                try:
                    item = self.run(receive.receive)
                except trio.EndOfChannel:
                    break
                yield item
        finally:
            self._cancel(scope)
        if failure:
            raise failure[0]
        if not completed:  # cancelled: the client left, or this process is stopping
            raise StreamAborted("the stream was cut short: the daemon is stopping or the client went away")

    def _cancel(self, scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(scope.cancel, trio_token=self._token)


async def unary(method: Callable[..., Any], request: Any, *, timeout: float,
                metadata: list[tuple[str, str]] | None = None) -> Any:
    """Await a unary-unary call; raises ``grpc.RpcError`` as grpcio does."""
    future = method.future(request, timeout=timeout, metadata=metadata)  # type: ignore[attr-defined]
    try:
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True, limiter=_THREADS)
    finally:
        if not future.done():
            future.cancel()


def _next(call: Iterator[Any]) -> Any:
    return next(call, _END)


class ResponseStream:
    """The responses of a server-streaming (or bidirectional) call, awaited from trio."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def receive(self) -> Any | None:
        """The next response, or None at the end of the stream; raises ``grpc.RpcError`` on failure."""
        try:
            item = await trio.to_thread.run_sync(_next, self._call, abandon_on_cancel=True, limiter=_THREADS)
        except BaseException:
            self._call.cancel()
            raise
        return None if item is _END else item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        while (item := await self.receive()) is not None:
            yield item

    def cancel(self) -> None:
        """End the call from this side."""
        self._call.cancel()


def server_stream(method: Callable[..., Any], request: Any, *, timeout: float | None = None,
                  metadata: list[tuple[str, str]] | None = None) -> ResponseStream:
    """Start a unary-stream call."""
    return ResponseStream(method(request, timeout=timeout, metadata=metadata))


class BidiStream(ResponseStream):
    """A bidirectional call: :meth:`send` never blocks, :meth:`receive` is awaited."""

    def __init__(self, method: Callable[..., Any], *, timeout: float | None = None,
                 metadata: list[tuple[str, str]] | None = None) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        super().__init__(method(iter(self._requests.get, _END), timeout=timeout, metadata=metadata))

    def send(self, request: Any) -> None:
        """Queue a request for the server."""
        self._requests.put(request)

    def done_writing(self) -> None:
        """Tell the server no more requests follow."""
        self._requests.put(_END)

    def cancel(self) -> None:
        """End the call from this side."""
        self._requests.put(_END)
        super().cancel()
