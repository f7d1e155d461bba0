"""The peer daemon in-process: ``p2p.daemon.serve`` in the test's trio nursery, a threaded HTTP origin that
honours Range and counts what it served, clients on the unix socket (DfdaemonDownload) and the upload port
(DfdaemonUpload), and an in-process scheduler for the seed test. Blocking grpcio calls run on threads."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from p2p import daemon as daemon_module
from p2p import grpc_bridge
from p2p.api import common, dfdaemon, download_stub, upload_stub
from p2p.config import PeerConfig
from p2p.daemon import Peer, serve
from p2p.taskid import task_id
from scheduler.server import SchedulerConfig, start
from seed.origin import Origin
from tests.registry_fixtures import local_http_server

PIECE = 4 << 20  # Dragonfly's piece length for anything up to 2 GiB
CONTENT = random.Random(20261203).randbytes(10 << 20)  # pieces 0, 1 (4 MiB each) and 2 (2 MiB)
SIZE = len(CONTENT)
SPANS = [(0, PIECE - 1), (PIECE, 2 * PIECE - 1), (2 * PIECE, SIZE - 1)]  # inclusive byte ranges of each piece
CHUNK = 256 << 10
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class OriginServer:
    """What the test origin serves and what it was asked: GET body bytes sent, ranges served, every request.

    ``status`` other than 200 answers every request with that status; ``hang`` never answers; ``gates`` holds
    a ranged GET starting at a given offset until the event is set.
    """

    def __init__(self, data: bytes = CONTENT, *, status: int = 200, hang: bool = False, ranges: bool = True) -> None:
        self.data = data
        self.status = status
        self.hang = hang
        self.honours_ranges = ranges
        self.gates: dict[int, threading.Event] = {}
        self.fail_offsets: set[int] = set()  # ranged GETs from these offsets answer 500 (after their gate)
        self.lock = threading.Lock()
        self.body_bytes = 0
        self.ranges: list[tuple[int, int]] = []
        self.requests: list[tuple[str, str | None]] = []
        self.closing = threading.Event()
        self.url = ""

    def gets(self) -> list[tuple[str, str | None]]:
        """The GET requests so far."""
        with self.lock:
            return [r for r in self.requests if r[0] == "GET"]

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        """A request handler class bound to this origin."""
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                wanted = self.headers.get("Range")
                with origin.lock:
                    origin.requests.append((self.command, wanted))
                if origin.hang:
                    origin.closing.wait(60)
                    self.close_connection = True
                    return
                if origin.status != 200:
                    self.send_response(origin.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last, status = 0, len(origin.data) - 1, 200
                match = _RANGE.match(wanted or "") if origin.honours_ranges else None
                if match:
                    first = int(match[1])
                    last = min(int(match[2]) if match[2] else last, len(origin.data) - 1)
                    status = 206
                    gate = origin.gates.get(first)
                    if body and gate is not None:
                        gate.wait(30)
                    if first in origin.fail_offsets:
                        self.send_response(500)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(status)
                if origin.honours_ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(last - first + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(origin.data)}")
                self.end_headers()
                if not body:
                    return
                try:
                    for offset in range(first, last + 1, CHUNK):
                        if origin.closing.is_set():
                            return
                        chunk = origin.data[offset:min(offset + CHUNK, last + 1)]
                        self.wfile.write(chunk)
                        with origin.lock:
                            origin.body_bytes += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with origin.lock:
                    origin.ranges.append((first, last))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    """An origin serving CONTENT at ``origin.url``."""
    yield from _serve(OriginServer())


def _serve(server: OriginServer) -> Iterator[OriginServer]:
    with local_http_server(server.handler()) as base:
        server.url = f"{base}/files/blob.bin"
        try:
            yield server
        finally:
            server.closing.set()
            for gate in server.gates.values():
                gate.set()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="lzpd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def peer_config(data_dir: Path, socket: Path, hostname: str = "t1", **overrides: Any) -> PeerConfig:
    """A daemon on 127.0.0.1 with every port picked by the kernel and metrics off."""
    values: dict[str, Any] = {"data_dir": data_dir, "socket": socket, "listen": "127.0.0.1", "ip": "127.0.0.1",
                              "grpc_port": 0, "vortex_port": 0, "metrics_port": 0, "hostname": hostname,
                              "schedulers": []}
    values.update(overrides)
    return PeerConfig(**values)


@asynccontextmanager
async def running_peer(config: PeerConfig) -> AsyncIterator[Peer]:
    """``serve(config)`` in a nursery of its own, cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        peer: Peer = await nursery.start(serve, config)
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()


def download_request(url: str, output: Path | None = None, **fields: Any) -> common.Download:
    """A Download as ``lazyfs get`` builds it."""
    download = common.Download(url=url, type=common.STANDARD, priority=common.LEVEL0, overwrite=True, **fields)
    if output is not None:
        download.output_path = str(output)
    return download


def _download(target: str, download: common.Download, timeout: float = 60) -> list[Any]:
    """DownloadTask on DfdaemonDownload (``unix:`` targets) or DfdaemonUpload (``host:port``)."""
    with grpc_bridge.channel(target) as chan:
        request = dfdaemon.DownloadTaskRequest(download=download)
        stub = download_stub(chan) if target.startswith("unix:") else upload_stub(chan)
        return list(stub.DownloadTask(request, timeout=timeout))


async def download(socket: Path, download_: common.Download, timeout: float = 60) -> list[Any]:
    """DownloadTask on the daemon's unix socket, every response (raises grpc.RpcError)."""
    return await trio.to_thread.run_sync(_download, f"unix:{socket}", download_, timeout)


async def download_error(socket: Path, download_: common.Download, timeout: float = 60) -> grpc.RpcError:
    """DownloadTask that must fail: its error."""
    with pytest.raises(grpc.RpcError) as caught:
        await download(socket, download_, timeout)
    return caught.value


async def call(socket: Path, method: str, request: Any) -> Any:
    """A unary DfdaemonDownload call on the unix socket."""
    def run() -> Any:
        with grpc_bridge.channel(f"unix:{socket}") as chan:
            return getattr(download_stub(chan), method)(request, timeout=10)
    return await trio.to_thread.run_sync(run)


def piece_numbers(responses: list[Any]) -> list[int]:
    """The piece numbers a DownloadTask stream reported, in order."""
    return [r.download_piece_finished_response.piece.number for r in responses[1:]]


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from metrics:\n{text}"
    return float(match[1])


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll *predicate* in the trio loop until true."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


# 1. DownloadTask over the unix socket, ListLocalTasks, StatTask, StatLocalTask


async def test_download_task_writes_output_and_streams_each_piece(origin: OriginServer, tmp_path: Path,
                                                                  short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    out = tmp_path / "out.bin"
    tid = task_id(origin.url)
    async with running_peer(peer_config(tmp_path / "data", sock)):
        responses = await download(sock, download_request(origin.url, out))

        first = responses[0]
        assert first.WhichOneof("response") == "download_task_started_response"
        assert first.download_task_started_response.content_length == SIZE
        assert not first.download_task_started_response.is_finished
        assert {r.task_id for r in responses} == {tid}
        assert all(r.WhichOneof("response") == "download_piece_finished_response" for r in responses[1:])
        assert sorted(piece_numbers(responses)) == [0, 1, 2]
        for r in responses[1:]:
            piece = r.download_piece_finished_response.piece
            assert (piece.offset, piece.offset + piece.length - 1) == SPANS[piece.number]
            assert piece.traffic_type == common.BACK_TO_SOURCE
            assert piece.digest.startswith("crc32:")
        assert out.read_bytes() == CONTENT
        assert origin.body_bytes == SIZE

        listing = await call(sock, "ListLocalTasks", dfdaemon.ListLocalTasksRequest())
        assert [(t.task_id, t.content_length, t.piece_length) for t in listing.tasks] == [(tid, SIZE, PIECE)]
        assert listing.tasks[0].HasField("finished_at")

        task = await call(sock, "StatTask", dfdaemon.StatTaskRequest(task_id=tid))
        assert (task.id, task.url, task.state, task.content_length, task.piece_count) == (
            tid, origin.url, "Succeeded", SIZE, 3)
        assert [p.number for p in task.pieces] == [0, 1, 2]

        local = await call(sock, "StatLocalTask", dfdaemon.StatLocalTaskRequest(task_id=tid))
        assert local.task_id == tid and local.content_length == SIZE

        with pytest.raises(grpc.RpcError) as caught:
            await call(sock, "StatTask", dfdaemon.StatTaskRequest(task_id="f" * 64))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# 2. Single flight


async def test_concurrent_downloads_of_one_url_cost_the_origin_one_copy(origin: OriginServer, tmp_path: Path,
                                                                        short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    gate = origin.gates[0] = threading.Event()  # hold piece 0 until both downloads are in
    results: dict[str, list[Any]] = {}

    async def fetch(name: str) -> None:
        results[name] = await download(sock, download_request(origin.url, tmp_path / name))

    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "a")
            await wait_for(lambda: len(origin.gets()) >= 1, what="the first download to reach the origin")
            nursery.start_soon(fetch, "b")
            await trio.sleep(0.3)  # the second DownloadTask is in, waiting on the running job
            gate.set()
        assert (tmp_path / "a").read_bytes() == CONTENT
        assert (tmp_path / "b").read_bytes() == CONTENT
        assert origin.body_bytes == SIZE
        assert sorted(origin.ranges) == SPANS
        assert peer.downloader.counters["source_bytes"] == SIZE
        assert sorted(piece_numbers(results["a"])) == sorted(piece_numbers(results["b"])) == [0, 1, 2]


# 3. Ranged download, then the whole task reusing its piece


async def test_ranged_download_fetches_only_its_piece_then_full_download_reuses_it(
        origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    start, length = PIECE + 100, 1000
    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        ranged = tmp_path / "range.bin"
        responses = await download(sock, download_request(origin.url, ranged,
                                                          range=common.Range(start=start, length=length)))
        started = responses[0].download_task_started_response
        assert started.content_length == SIZE
        assert (started.range.start, started.range.length) == (start, length)
        assert piece_numbers(responses) == [1]
        assert ranged.read_bytes() == CONTENT[start:start + length]
        assert origin.ranges == [SPANS[1]]
        assert origin.body_bytes == PIECE
        tid = task_id(origin.url)
        assert set(peer.storage.pieces(tid)) == {1}

        full = tmp_path / "full.bin"
        responses = await download(sock, download_request(origin.url, full))
        assert sorted(piece_numbers(responses)) == [0, 1, 2]
        assert full.read_bytes() == CONTENT
        assert sorted(origin.ranges) == SPANS  # piece 1 once: reused, not fetched again
        assert origin.body_bytes == SIZE
        task = await call(sock, "StatTask", dfdaemon.StatTaskRequest(task_id=tid))
        assert task.state == "Succeeded" and len(task.pieces) == 3


async def test_range_past_the_end_is_refused(origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    async with running_peer(peer_config(tmp_path / "data", sock)):
        error = await download_error(sock, download_request(origin.url, tmp_path / "x",
                                                            range=common.Range(start=SIZE - 10, length=20)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "outside" in (error.details() or "")
        assert origin.body_bytes == 0


# 4. SyncPieces streams pieces as they complete


def _sync_pieces(port: int, tid: str, interested: list[int], into: queue.Queue[Any]) -> None:
    """SyncPieces on the upload port; puts (number, offset, length, ip, tcp_port, arrival) then None or the error."""
    with grpc_bridge.channel(f"127.0.0.1:{port}") as chan:
        request = dfdaemon.SyncPiecesRequest(host_id="127.0.0.1-child", task_id=tid,
                                             interested_piece_numbers=interested)
        try:
            for answer in upload_stub(chan).SyncPieces(request, timeout=60):
                into.put((answer.number, answer.offset, answer.length, answer.ip, answer.tcp_port, time.monotonic()))
        except grpc.RpcError as exc:
            into.put(exc)
            return
    into.put(None)


async def _next(items: queue.Queue[Any], timeout: float = 10.0) -> Any:
    return await trio.to_thread.run_sync(functools.partial(items.get, timeout=timeout))


async def test_sync_pieces_streams_pieces_as_they_complete(origin: OriginServer, tmp_path: Path,
                                                           short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    tid = task_id(origin.url)
    gates = {offset: threading.Event() for offset, _ in SPANS}
    origin.gates.update(gates)
    outcome: list[Any] = []

    async def fetch() -> None:
        outcome.append(await download(sock, download_request(origin.url, tmp_path / "out")))

    async with running_peer(peer_config(tmp_path / "data", sock)) as peer, trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        await wait_for(lambda: peer.storage.task(tid) is not None, what="the task to exist")
        every: queue.Queue[Any] = queue.Queue()
        only_one: queue.Queue[Any] = queue.Queue()
        nursery.start_soon(trio.to_thread.run_sync, _sync_pieces, peer.grpc_port, tid, [], every)
        nursery.start_soon(trio.to_thread.run_sync, _sync_pieces, peer.grpc_port, tid, [1], only_one)
        await wait_for(lambda: len(origin.gets()) == 3, what="the three piece requests")
        await trio.sleep(0.2)
        assert every.empty() and only_one.empty()  # nothing is held yet

        released = []
        for number in (1, 0, 2):  # completion order, not number order
            gates[SPANS[number][0]].set()
            released.append(time.monotonic())
            got = await _next(every)
            assert not isinstance(got, Exception), got
            assert got[:5] == (number, SPANS[number][0], SPANS[number][1] - SPANS[number][0] + 1, "127.0.0.1",
                               peer.vortex_port)
            assert got[5] >= released[-1]  # streamed after the piece finished, not batched at the end
            if number == 1:
                first = await _next(only_one)
                assert first[0] == 1
                assert await _next(only_one) is None  # ended after its last interested piece...
                assert peer.storage.task(tid).finished_pieces == 1  # ...while the download still runs
            if number != 2:
                await trio.sleep(0.2)
                assert every.empty()  # one piece finished, one piece streamed
        assert await _next(every) is None  # and the stream ends with the last piece
    assert outcome and sorted(piece_numbers(outcome[0])) == [0, 1, 2]
    assert (tmp_path / "out").read_bytes() == CONTENT


async def test_sync_pieces_of_unknown_task_is_not_found(origin: OriginServer, tmp_path: Path,
                                                        short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        answers: queue.Queue[Any] = queue.Queue()
        await trio.to_thread.run_sync(_sync_pieces, peer.grpc_port, "e" * 64, [], answers)
        error = answers.get_nowait()
        assert isinstance(error, grpc.RpcError)
        assert error.code() == grpc.StatusCode.NOT_FOUND

        # A finished task: the held pieces at once, then the end.
        await download(sock, download_request(origin.url))
        answers = queue.Queue()
        await trio.to_thread.run_sync(_sync_pieces, peer.grpc_port, task_id(origin.url), [], answers)
        numbers = []
        while (item := answers.get_nowait()) is not None:
            numbers.append(item[0])
        assert sorted(numbers) == [0, 1, 2]


# 5. Two daemons, a scheduler, a seed


async def test_peer_downloads_from_the_seed_through_the_scheduler(origin: OriginServer, tmp_path: Path,
                                                                  short_dir: Path) -> None:
    server, port, state = await trio.to_thread.run_sync(
        start, SchedulerConfig(listen="127.0.0.1:0", workers=16, retry_interval=0.1))
    schedulers = [f"127.0.0.1:{port}"]
    out = tmp_path / "out.bin"
    try:
        async with running_peer(peer_config(tmp_path / "seed", short_dir / "s.sock", "s1", seed=True,
                                            schedulers=schedulers)) as seed, \
                running_peer(peer_config(tmp_path / "peer", short_dir / "p.sock", "p1",
                                         schedulers=schedulers)) as peer:
            def announced() -> bool:
                with state.resources.lock:
                    return {seed.config.host_id, peer.config.host_id} <= set(state.resources.hosts)
            await wait_for(announced, what="both hosts announced")

            responses = await download(short_dir / "p.sock", download_request(origin.url, out))
            assert out.read_bytes() == CONTENT
            assert sorted(piece_numbers(responses)) == [0, 1, 2]
            pieces = [r.download_piece_finished_response.piece for r in responses[1:]]
            assert {p.traffic_type for p in pieces} == {common.REMOTE_PEER}
            assert {p.parent_id.split("-seed")[0].startswith("127.0.0.1-s1") for p in pieces} == {True}

            text = peer.metrics()
            assert metric(text, "lazyfs_peer_seed_bytes_total") == SIZE
            assert metric(text, "lazyfs_peer_source_bytes_total") == 0
            assert metric(text, "lazyfs_peer_peer_bytes_total") == 0
            assert seed.downloader.counters["source_bytes"] == SIZE
            assert origin.body_bytes == SIZE  # one copy, fetched by the seed
            assert seed.storage.task(task_id(origin.url)).state == "succeeded"
    finally:
        await trio.to_thread.run_sync(state.stop, server, 0)


# 6. Restart on the same data_dir


async def test_restarted_daemon_keeps_completed_task(origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    config = peer_config(tmp_path / "data", sock)
    tid = task_id(origin.url)
    async with running_peer(config):
        await download(sock, download_request(origin.url, tmp_path / "first"))
    requests = len(origin.requests)
    assert origin.body_bytes == SIZE

    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        task = await call(sock, "StatTask", dfdaemon.StatTaskRequest(task_id=tid))
        assert task.state == "Succeeded" and [p.number for p in task.pieces] == [0, 1, 2]
        responses = await download(sock, download_request(origin.url, tmp_path / "second"))
        assert responses[0].download_task_started_response.is_finished
        assert (tmp_path / "second").read_bytes() == CONTENT
        assert origin.body_bytes == SIZE
        assert len(origin.requests) == requests  # not even a stat
        assert peer.downloader.counters["source_bytes"] == 0


# 7. Download.digest


async def test_wrong_digest_fails_and_leaves_no_succeeded_task(origin: OriginServer, tmp_path: Path,
                                                               short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    tid = task_id(origin.url)
    wrong = "sha256:" + "0" * 64
    out = tmp_path / "out.bin"
    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        error = await download_error(sock, download_request(origin.url, out, digest=wrong))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert f"expected {wrong}" in details
        assert "sha256:" + hashlib.sha256(CONTENT).hexdigest() in details
        assert not out.exists()
        info = peer.storage.task(tid)
        assert info is None or info.state != "succeeded"
        listing = await call(sock, "ListLocalTasks", dfdaemon.ListLocalTasksRequest())
        assert all(t.task_id != tid or not t.HasField("finished_at") for t in listing.tasks)

        right = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
        await download(sock, download_request(origin.url, out, digest=right))
        assert out.read_bytes() == CONTENT
        assert peer.storage.task(tid).state == "succeeded"


# 8. Origin failures reach the client, bounded


@pytest.fixture
def failing_origin() -> Iterator[OriginServer]:
    """An origin answering 500 to everything."""
    yield from _serve(OriginServer(status=500))


@pytest.fixture
def hanging_origin() -> Iterator[OriginServer]:
    """An origin that accepts connections and never answers."""
    yield from _serve(OriginServer(hang=True))


async def test_origin_500_fails_the_download_with_its_status(failing_origin: OriginServer, tmp_path: Path,
                                                             short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        began = time.monotonic()
        error = await download_error(sock, download_request(failing_origin.url, tmp_path / "out"))
        elapsed = time.monotonic() - began
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "500" in (error.details() or "")
        assert "attempts" in (error.details() or "")
        assert elapsed < 20
        assert not (tmp_path / "out").exists()
        assert peer.downloader.counters["download_failures"] == 1
        assert not peer.downloader.jobs  # the failed job is gone: a retry starts afresh


async def test_hanging_origin_fails_the_download_with_a_timeout(hanging_origin: OriginServer, tmp_path: Path,
                                                                short_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon's origin client waits 30 s per attempt, 4 attempts (2+ minutes before a client hears anything):
    # shrink that, through PeerConfig's source_timeout/source_retries where it has them, else by patching.
    sock = short_dir / "p.sock"
    knobs: dict[str, Any] = {}
    if {"source_timeout", "source_retries"} <= {f.name for f in dataclasses.fields(PeerConfig)}:
        knobs = {"source_timeout": 1.0, "source_retries": 2}
    else:
        monkeypatch.setattr(daemon_module, "Origin",
                            lambda **kw: Origin(**{**kw, "timeout": 1.0, "retries": 2, "backoff": 0.1}))
    async with running_peer(peer_config(tmp_path / "data", sock, **knobs)):
        began = time.monotonic()
        error = await download_error(sock, download_request(hanging_origin.url, tmp_path / "out"))
        elapsed = time.monotonic() - began
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = (error.details() or "").lower()
        assert "within 1 s" in details or "timed out" in details or "timeout" in details, details
        assert "2 attempts" in details
        assert elapsed < 10


# 9. The CLI against the in-process daemon


def _lazyfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)


async def test_cli_get_and_tasks(origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    out = tmp_path / "cli.bin"
    async with running_peer(peer_config(tmp_path / "data", sock)):
        got = await trio.to_thread.run_sync(_lazyfs, "get", origin.url, "-O", str(out), "--socket", str(sock), "-q")
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == CONTENT

        listed = await trio.to_thread.run_sync(_lazyfs, "tasks", "--socket", str(sock), "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert rows == [{"task_id": task_id(origin.url), "url": origin.url, "state": "Succeeded",
                         "content_length": SIZE, "piece_count": 3, "pieces_held": 3}]

        table = await trio.to_thread.run_sync(_lazyfs, "tasks", "--socket", str(sock))
        assert table.returncode == 0 and "3/3" in table.stdout and origin.url in table.stdout


async def test_cli_get_without_daemon_says_so(tmp_path: Path, short_dir: Path) -> None:
    got = await trio.to_thread.run_sync(_lazyfs, "get", "http://127.0.0.1:9/x", "-O", str(tmp_path / "x"),
                                        "--socket", str(short_dir / "none.sock"), "-q")
    assert got.returncode != 0
    assert "no peer daemon answers" in got.stderr
    assert not (tmp_path / "x").exists()


async def test_cli_get_reports_origin_failure(failing_origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    knobs = {"source_retries": 1} if "source_retries" in {f.name for f in dataclasses.fields(PeerConfig)} else {}
    async with running_peer(peer_config(tmp_path / "data", sock, **knobs)):
        got = await trio.to_thread.run_sync(_lazyfs, "get", failing_origin.url, "-O", str(tmp_path / "x"),
                                            "--socket", str(sock), "-q")
    assert got.returncode == 1
    assert got.stderr.startswith("lazyfs get: download failed:")
    assert "500" in got.stderr


# 10. PeerConfig.load


def test_config_load_file_then_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "peer.toml"
    toml.write_text('data_dir = "/srv/peer"\nsocket = "/run/x.sock"\nseed = true\nschedulers = ["a:8002", "b:8002"]\n'
                    'upload_limit = 1000\nhostname = "from-file"\ngrpc_port = 4100\n')
    config = PeerConfig.load(toml, hostname="from-flag", grpc_port=None, upload_limit=5)
    assert config.data_dir == Path("/srv/peer") and isinstance(config.data_dir, Path)
    assert config.socket == Path("/run/x.sock")
    assert config.seed is True
    assert config.schedulers == ["a:8002", "b:8002"]
    assert config.hostname == "from-flag"  # overrides win
    assert config.upload_limit == 5
    assert config.grpc_port == 4100  # a None override leaves the file's value
    assert config.vortex_port == 4005  # untouched defaults stay
    assert config.host_id == "127.0.0.1-from-flag-seed"

    assert PeerConfig.load(None, data_dir="/d").data_dir == Path("/d")


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    toml = tmp_path / "peer.toml"
    toml.write_text("grpc_port = 4100\nbogus = 1\n")
    with pytest.raises(ValueError, match="bogus"):
        PeerConfig.load(toml)
    with pytest.raises(ValueError, match="nonsense"):
        PeerConfig.load(None, nonsense=3)


# More edges: output paths, empty content, origins without Range, digests of cached tasks, interrupted downloads


async def test_output_path_must_be_absolute_and_is_not_overwritten_unasked(origin: OriginServer, tmp_path: Path,
                                                                           short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    async with running_peer(peer_config(tmp_path / "data", sock)):
        relative = download_request(origin.url)
        relative.output_path = "relative/out.bin"
        error = await download_error(sock, relative)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert origin.requests == []

        existing = tmp_path / "existing"
        existing.write_bytes(b"keep me")
        keep = download_request(origin.url, existing)
        keep.overwrite = False
        error = await download_error(sock, keep)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "exists" in (error.details() or "")
        assert existing.read_bytes() == b"keep me"


async def test_whole_content_output_is_a_hard_link_else_a_copy(origin: OriginServer, tmp_path: Path,
                                                               short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    linked, ranged = tmp_path / "linked.bin", tmp_path / "ranged.bin"
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: another filesystem than the data dir
    try:
        async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
            await download(sock, download_request(origin.url, linked))
            content = peer.storage.content_path(task_id(origin.url))
            assert linked.read_bytes() == CONTENT
            assert linked.stat().st_ino == content.stat().st_ino and content.stat().st_nlink == 2

            part = download_request(origin.url, ranged, range=common.Range(start=5, length=100))
            await download(sock, part)
            assert ranged.read_bytes() == CONTENT[5:105] and ranged.stat().st_nlink == 1

            copied = elsewhere / "copied.bin"
            await download(sock, download_request(origin.url, copied))
            assert copied.read_bytes() == CONTENT and copied.stat().st_nlink == 1

            forced = download_request(origin.url, elsewhere / "forced.bin", force_hard_link=True)
            error = await download_error(sock, forced)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot hard-link" in (error.details() or "")
            assert not (elsewhere / "forced.bin").exists()
            assert origin.body_bytes == SIZE  # every output came from the one cached copy
    finally:
        shutil.rmtree(elsewhere)


@pytest.fixture
def empty_origin() -> Iterator[OriginServer]:
    """An origin serving zero bytes."""
    yield from _serve(OriginServer(b""))


async def test_empty_content_downloads_to_an_empty_file(empty_origin: OriginServer, tmp_path: Path,
                                                        short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    out = tmp_path / "empty"
    async with running_peer(peer_config(tmp_path / "data", sock)):
        responses = await download(sock, download_request(empty_origin.url, out), timeout=20)
        assert len(responses) == 1
        assert responses[0].download_task_started_response.content_length == 0
        assert out.read_bytes() == b""
        task = await call(sock, "StatTask", dfdaemon.StatTaskRequest(task_id=task_id(empty_origin.url)))
        assert task.state == "Succeeded" and task.piece_count == 0


@pytest.fixture
def rangeless_origin() -> Iterator[OriginServer]:
    """An origin that ignores Range and advertises no Accept-Ranges."""
    yield from _serve(OriginServer(ranges=False))


async def test_origin_without_ranges_is_read_once_in_a_stream(rangeless_origin: OriginServer, tmp_path: Path,
                                                              short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    out = tmp_path / "out"
    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        responses = await download(sock, download_request(rangeless_origin.url, out))
        assert sorted(piece_numbers(responses)) == [0, 1, 2]
        assert out.read_bytes() == CONTENT
        # The stat's one-byte probe (answered with the whole content, left unread) and one streamed read.
        assert len(rangeless_origin.gets()) == 2
        assert peer.downloader.counters["source_bytes"] == SIZE


async def test_wrong_digest_fails_even_when_the_task_is_already_complete(origin: OriginServer, tmp_path: Path,
                                                                         short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    wrong = "sha256:" + "0" * 64
    async with running_peer(peer_config(tmp_path / "data", sock)):
        await download(sock, download_request(origin.url, tmp_path / "first"))  # no digest: completes
        out = tmp_path / "second"
        error = await download_error(sock, download_request(origin.url, out, digest=wrong))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"expected {wrong}" in (error.details() or "")
        assert not out.exists()


async def test_download_interrupted_by_a_restart_resumes_with_the_missing_pieces(origin: OriginServer,
                                                                                 tmp_path: Path,
                                                                                 short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    tid = task_id(origin.url)
    gates = {offset: threading.Event() for offset, _ in SPANS}
    origin.gates.update(gates)
    async with trio.open_nursery() as nursery:
        peer = await nursery.start(serve, peer_config(tmp_path / "data", sock))

        async def doomed() -> None:
            with pytest.raises(grpc.RpcError):
                await download(sock, download_request(origin.url, tmp_path / "first"))
        nursery.start_soon(doomed)
        await wait_for(lambda: len(origin.gets()) == 3, what="the three piece requests")
        gates[0].set()
        await wait_for(lambda: set(peer.storage.pieces(tid)) == {0}, what="piece 0 stored")
        nursery.cancel_scope.cancel()  # the daemon stops mid-download; its client's call ends
    origin.gates.clear()
    for gate in gates.values():
        gate.set()  # the abandoned requests' handlers write into closed connections
    assert origin.ranges == [SPANS[0]]

    async with running_peer(peer_config(tmp_path / "data", sock)) as peer:
        assert set(peer.storage.pieces(tid)) == {0}
        out = tmp_path / "second"
        responses = await download(sock, download_request(origin.url, out))
        assert sorted(piece_numbers(responses)) == [0, 1, 2]
        assert out.read_bytes() == CONTENT
        await wait_for(lambda: len(origin.ranges) == 3, what="the resumed pieces")
        assert sorted(origin.ranges) == SPANS  # piece 0 was not fetched again
        assert peer.downloader.counters["source_bytes"] == SIZE - PIECE


async def test_daemon_stopping_mid_download_does_not_report_success(origin: OriginServer, tmp_path: Path,
                                                                    short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    out = tmp_path / "out"
    tid = task_id(origin.url)
    gates = {offset: threading.Event() for offset, _ in SPANS}
    origin.gates.update(gates)
    outcome: list[Any] = []
    try:
        async with trio.open_nursery() as nursery:
            peer = await nursery.start(serve, peer_config(tmp_path / "data", sock))

            async def client() -> None:
                try:
                    outcome.append(await download(sock, download_request(origin.url, out), timeout=20))
                except grpc.RpcError as exc:
                    outcome.append(exc)
            nursery.start_soon(client)
            await wait_for(lambda: len(origin.gets()) == 3, what="the three piece requests")
            gates[0].set()
            gates[SPANS[2][0]].set()
            await wait_for(lambda: set(peer.storage.pieces(tid)) == {0, 2}, what="pieces 0 and 2 stored")
            nursery.cancel_scope.cancel()  # stop the daemon while piece 1 is still on its way
    finally:
        for gate in gates.values():
            gate.set()
    # Either buggy outcome fails here: a clean end of stream (and an output file whose piece 1 is zeros), or
    # "Cannot operate on a closed database" (UNKNOWN) when the output is written after storage closed.
    assert isinstance(outcome[0], grpc.RpcError), "the download reported success with piece 1 missing"
    assert outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED), (
        outcome[0].code(), outcome[0].details())
    assert not out.exists()


async def test_sync_pieces_ends_with_an_error_when_the_download_fails(origin: OriginServer, tmp_path: Path,
                                                                      short_dir: Path) -> None:
    sock = short_dir / "p.sock"
    tid = task_id(origin.url)
    gates = {offset: threading.Event() for offset, _ in SPANS}
    origin.gates.update(gates)
    origin.fail_offsets.add(SPANS[1][0])
    knobs = {"source_retries": 1} if "source_retries" in {f.name for f in dataclasses.fields(PeerConfig)} else {}
    async with running_peer(peer_config(tmp_path / "data", sock, **knobs)) as peer, \
            trio.open_nursery() as nursery:
        async def client() -> None:
            error = await download_error(sock, download_request(origin.url, tmp_path / "out"))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "500" in (error.details() or "")
        nursery.start_soon(client)
        await wait_for(lambda: peer.storage.task(tid) is not None, what="the task to exist")
        answers: queue.Queue[Any] = queue.Queue()
        nursery.start_soon(trio.to_thread.run_sync, _sync_pieces, peer.grpc_port, tid, [], answers)
        await wait_for(lambda: len(origin.gets()) == 3, what="the three piece requests")
        gates[0].set()
        assert (await _next(answers))[0] == 0
        gates[SPANS[1][0]].set()  # piece 1 fails at the origin: the task fails
        began = time.monotonic()
        end = await _next(answers, timeout=15)
        assert isinstance(end, grpc.RpcError), end
        assert end.code() == grpc.StatusCode.NOT_FOUND and "failed" in (end.details() or "")
        assert time.monotonic() - began < 10
        gates[SPANS[2][0]].set()
        info = peer.storage.task(tid)
        assert info is not None and info.state == "failed"


async def test_delete_task_and_metrics_endpoint(origin: OriginServer, tmp_path: Path, short_dir: Path) -> None:
    import socket as socket_module

    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    sock = short_dir / "p.sock"
    tid = task_id(origin.url)
    async with running_peer(peer_config(tmp_path / "data", sock, metrics_port=metrics_port)) as peer:
        await download(sock, download_request(origin.url))

        def scrape() -> str:
            import httpx
            return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        text = await trio.to_thread.run_sync(scrape)
        assert metric(text, "lazyfs_peer_source_bytes_total") == SIZE
        assert metric(text, "lazyfs_peer_downloads_total") == 1
        assert metric(text, "lazyfs_peer_tasks") == 1
        assert f'host_id="{peer.config.host_id}"' in text

        await call(sock, "DeleteTask", dfdaemon.DeleteTaskRequest(task_id=tid))
        assert peer.storage.task(tid) is None
        assert not peer.storage.content_path(tid).exists()
        for method, request in (("DeleteTask", dfdaemon.DeleteTaskRequest(task_id=tid)),
                                ("StatTask", dfdaemon.StatTaskRequest(task_id=tid))):
            with pytest.raises(grpc.RpcError) as caught:
                await call(sock, method, request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_upload_port_download_task_as_the_scheduler_triggers_a_seed(origin: OriginServer, tmp_path: Path,
                                                                          short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    async with running_peer(peer_config(tmp_path / "data", sock, "s1", seed=True)) as seed:
        request = download_request(origin.url, need_back_to_source=True)
        responses = await trio.to_thread.run_sync(_download, f"127.0.0.1:{seed.grpc_port}", request)
        assert responses[0].download_task_started_response.content_length == SIZE
        assert {r.host_id for r in responses} == {"127.0.0.1-s1-seed"}
        assert sorted(piece_numbers(responses)) == [0, 1, 2]

        def stat() -> Any:
            with grpc_bridge.channel(f"127.0.0.1:{seed.grpc_port}") as chan:
                return upload_stub(chan).StatTask(dfdaemon.StatTaskRequest(task_id=task_id(origin.url)), timeout=10)
        task = await trio.to_thread.run_sync(stat)
        assert task.state == "Succeeded" and len(task.pieces) == 3
        assert origin.body_bytes == SIZE
