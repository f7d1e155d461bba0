"""Downloading one task, as Dragonfly's client does: stat the source, register with the scheduler, then follow
its answers (peers, back-to-source, empty) until every wanted piece is stored.

One job per task at a time (single flight); a ranged download wants only the pieces its range covers and
shares them with the whole-content task. Without a usable scheduler a peer goes to the origin itself when
back-to-source is allowed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import trio

from p2p import grpc_bridge
from p2p import reporter as report
from p2p.api import HOST_TYPE_SEED, common, scheduler, scheduler_stub
from p2p.backsource import SourceFailed, fetch_from_source, stream_from_source
from p2p.collector import PieceCollector
from p2p.config import PeerConfig
from p2p.direct_io import aligned_buffer, read_into
from p2p.pieces import Piece, piece_length, pieces
from p2p.ratelimit import RateLimiter
from p2p.scheduler_ring import SchedulerRing
from p2p.storage import Storage, StorageError, TaskInfo
from p2p.taskid import blob_digest_task_id, content_task_id, peer_id, task_id
from seed.origin import Origin, OriginError

if TYPE_CHECKING:
    from p2p.announcer import Announcer

log = logging.getLogger("lazyfs.peer")
DIGEST_CHUNK = 8 << 20


class DownloadError(Exception):
    """A download that cannot complete; the message says why. *origin* is the origin's refusal (status and
    headers), when that is what failed before the download began."""

    def __init__(self, message: str, *, origin: OriginError | None = None) -> None:
        super().__init__(message)
        self.origin = origin


class SchedulerUnusable(Exception):
    """The scheduler is unreachable or gave up scheduling this peer."""


def download_task_id(download: common.Download) -> str:
    """The task id of a Download, by content, by blob digest, or by URL (Dragonfly's three modes)."""
    if download.HasField("content_for_calculating_task_id"):
        return content_task_id(download.content_for_calculating_task_id.encode())
    if download.enable_task_id_based_blob_digest and (by_digest := blob_digest_task_id(download.url)):
        return by_digest
    return task_id(download.url, tag=download.tag, application=download.application,
                   piece_length=download.piece_length if download.HasField("piece_length") else None,
                   filtered_query_params=download.filtered_query_params)


def wanted_pieces(info: TaskInfo, download: common.Download) -> list[Piece]:
    """The pieces a download needs: all, or those its range covers."""
    every = pieces(info.content_length, info.piece_length) if info.content_length else []
    if not download.HasField("range") or download.range.length == 0:
        return every
    start, end = download.range.start, download.range.start + download.range.length
    if start >= info.content_length or end > info.content_length:
        raise DownloadError(f"range {start}+{download.range.length} outside {info.content_length} bytes")
    return [p for p in every if p.offset < end and p.offset + p.length > start]


def _hash_fd(fd: int, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    buffer = aligned_buffer(DIGEST_CHUNK)  # one per call, reused read after read
    offset = 0
    while True:
        data = read_into(fd, buffer, offset, DIGEST_CHUNK)
        h.update(data)
        offset += len(data)
        if len(data) < DIGEST_CHUNK:  # the end: a short read leaves an unaligned offset
            return h.hexdigest()


@dataclass
class Job:
    """One running download of a task."""

    download: common.Download
    task_id: str
    peer_id: str
    info: TaskInfo | None = None
    wanted: list[Piece] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    ranges: bool = True  # whether the origin honours Range (learnt from its stat)
    origin_error: OriginError | None = None  # the origin's refusal, if that is how the job failed


class Downloader:
    """Runs downloads for the daemon's services."""

    def __init__(self, config: PeerConfig, storage: Storage, origin: Origin, ring: SchedulerRing | None,
                 channels: grpc_bridge.ChannelPool, nursery: trio.Nursery) -> None:
        self.config = config
        self.storage = storage
        self.origin = origin
        self.ring = ring
        self.channels = channels
        self.nursery = nursery
        self.limiter = RateLimiter(config.download_limit)
        self.jobs: dict[str, Job] = {}
        self.verified: dict[str, str] = {}  # task id -> the digest its complete content was checked against
        self.announcer: Announcer | None = None  # keeps schedulers informed; set by the daemon
        self.counters = {"downloads": 0, "download_failures": 0, "peer_bytes": 0, "seed_bytes": 0, "source_bytes": 0}

    async def start(self, download: common.Download) -> Job:
        """Begin (or join) the download; returns once the task's length is known, raising DownloadError."""
        tid = download_task_id(download)
        while (running := self.jobs.get(tid)) is not None:  # single flight
            if not running.download.HasField("range"):  # it fetches every piece: join it
                await running.ready.wait()
                if running.error:
                    raise DownloadError(running.error, origin=running.origin_error)
                return running
            await running.done.wait()
        job = Job(download, tid, peer_id(self.config.ip, self.config.hostname, seed=self.config.seed))
        self.jobs[tid] = job
        self.nursery.start_soon(self._run, job)
        await job.ready.wait()
        if job.error:
            raise DownloadError(job.error, origin=job.origin_error)
        return job

    async def _run(self, job: Job) -> None:
        self.counters["downloads"] += 1
        try:
            await self._prepare(job)
            job.ready.set()
            await self._download(job)
            await self._verify(job)
        except Exception as exc:  # one failed download must not take the daemon down
            self.counters["download_failures"] += 1
            expected = isinstance(exc, DownloadError | SourceFailed | OriginError | StorageError)
            log.error("download failed task=%s url=%s error=%s", job.task_id, job.download.url, exc,
                      exc_info=not expected)
            stored = self.storage.task(job.task_id)
            if stored is not None and stored.state != "succeeded":  # a complete task stays served
                self.storage.fail_task(job.task_id)
            job.origin_error = exc if isinstance(exc, OriginError) else None
            job.error = str(exc) if expected else f"internal error: {exc!r}"
        finally:  # wakes every waiter, whatever happened
            self.jobs.pop(job.task_id, None)
            job.ready.set()
            job.done.set()

    async def _prepare(self, job: Job) -> None:
        """Learn the content length (the source's stat, as every Dragonfly peer does) and create the task."""
        existing = self.storage.task(job.task_id)
        if existing is not None and existing.state == "succeeded":
            job.info = existing
            job.wanted = wanted_pieces(existing, job.download)
            return
        source = await self.origin.stat(job.download.url, dict(job.download.request_header))
        job.ranges = source.ranges
        length = piece_length(source.content_length,
                              job.download.piece_length if job.download.HasField("piece_length") else None)
        job.info = self.storage.ensure_task(job.task_id, url=job.download.url, content_length=source.content_length,
                                            piece_length=length, download=job.download.SerializeToString())
        job.wanted = wanted_pieces(job.info, job.download)

    def _missing(self, job: Job) -> list[Piece]:
        have = self.storage.pieces(job.task_id)
        return [p for p in job.wanted if p.number not in have]

    async def _download(self, job: Job) -> None:
        if not self._missing(job):
            return
        try:
            await self._with_scheduler(job)
        except SchedulerUnusable as exc:
            if job.download.disable_back_to_source or not self.config.back_to_source_fallback:
                raise DownloadError(f"{exc}; back-to-source is disabled") from exc
            log.warning("scheduler unusable task=%s reason=%s: fetching from the source", job.task_id, exc)
        missing = self._missing(job)
        if missing:
            await self._source(job, missing, report.NoScheduler())

    async def _source(self, job: Job, missing: list[Piece], reporter: report.Reporter) -> None:
        assert job.info is not None
        if job.ranges:
            fetched = await fetch_from_source(self.storage, self.origin, job.download, job.task_id, missing, reporter,
                                              concurrency=self.config.concurrent_pieces)
        else:
            fetched = await stream_from_source(self.storage, self.origin, job.download, job.info, reporter)
        self.counters["source_bytes"] += fetched

    async def _verify(self, job: Job) -> None:
        """Finish the task when complete; check the whole content against Download.digest if one was given."""
        assert job.info is not None
        if self._missing(job):
            raise DownloadError(f"task {job.task_id}: {len(self._missing(job))} pieces still missing")
        if len(self.storage.pieces(job.task_id)) < job.info.piece_count:
            return  # a ranged download: the task itself stays partial
        if job.download.HasField("digest") and self.verified.get(job.task_id) != job.download.digest:
            try:
                await self._check_digest(job.task_id, job.download.digest)
            except DownloadError:
                if job.info.state != "succeeded":  # every piece passed its crc32: the source itself differs
                    self.storage.delete_task(job.task_id)
                raise
            self.verified[job.task_id] = job.download.digest
        job.info = self.storage.finish_task(job.task_id)

    async def _check_digest(self, tid: str, digest: str) -> None:
        algorithm, _, expected = digest.partition(":")
        if algorithm not in ("sha256", "sha512"):
            raise DownloadError(f"unsupported digest {digest!r}")
        with self.storage.content_fd(tid, direct=True) as fd:
            actual = await trio.to_thread.run_sync(_hash_fd, fd, algorithm)
        if actual != expected:
            raise DownloadError(f"task {tid}: content is {algorithm}:{actual}, expected {digest}")

    async def _with_scheduler(self, job: Job) -> None:
        """Follow the scheduler's answers until the wanted pieces are stored."""
        if self.ring is None or not self.ring:
            raise SchedulerUnusable("no scheduler configured")
        target = self.ring.pick(job.task_id)
        try:
            await self._announce_peer(job, target)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self.announcer is not None:
                self.announcer.lost(target)  # announce host and tasks again when it answers
            if (exc.code() != grpc.StatusCode.NOT_FOUND or self.announcer is None
                    or not await self.announcer.announce(target)):
                raise SchedulerUnusable(f"scheduler {target}: {exc.code().name} {exc.details()}") from exc
            log.info("scheduler did not know this host: announced again scheduler=%s", target)  # it restarted
            try:
                await self._announce_peer(job, target)
            except grpc.RpcError as again:
                raise SchedulerUnusable(f"scheduler {target}: {again.code().name} {again.details()}") from again

    async def _announce_peer(self, job: Job, target: str) -> None:
        stream = grpc_bridge.BidiStream(scheduler_stub(self.channels.get(target)).AnnouncePeer)
        reporter = report.SchedulerStream(stream, self.config.host_id, job.task_id, job.peer_id)
        try:
            reporter.send(register_peer_request=scheduler.RegisterPeerRequest(download=self._register(job)))
            await self._follow(job, stream, reporter)
            await self._close(stream)
        finally:
            stream.cancel()

    def _register(self, job: Job) -> common.Download:
        assert job.info is not None
        download = common.Download()
        download.CopyFrom(job.download)
        download.actual_content_length = job.info.content_length
        download.actual_piece_length = job.info.piece_length
        download.actual_piece_count = job.info.piece_count
        download.concurrent_piece_count = self.config.concurrent_pieces
        if self.config.seed:
            download.need_back_to_source = True
        download.ClearField("output_path")
        return download

    async def _follow(self, job: Job, stream: grpc_bridge.BidiStream, reporter: report.SchedulerStream) -> None:
        started = False
        for _ in range(self.config.max_schedule_count + 1):
            answer = await self._answer(stream)
            kind = answer.WhichOneof("response")
            if kind == "empty_task_response" or (kind == "normal_task_response" and not self._missing(job)):
                self._send_started(reporter, started)
                reporter.send(download_peer_finished_request=scheduler.DownloadPeerFinishedRequest())
                return
            if kind == "need_back_to_source_response":
                await self._from_source(job, reporter)
                return
            if kind != "normal_task_response":
                raise SchedulerUnusable(f"unexpected scheduler answer {kind}")
            self._send_started(reporter, started)
            first, started = not started, True
            if await self._from_parents(job, list(answer.normal_task_response.candidate_parents), reporter,
                                        first=first):
                reporter.send(download_peer_finished_request=scheduler.DownloadPeerFinishedRequest())
                return
        reporter.send(download_peer_failed_request=scheduler.DownloadPeerFailedRequest(
            description="max schedule count exceeded"))
        raise SchedulerUnusable("max schedule count exceeded")

    async def _answer(self, stream: grpc_bridge.BidiStream) -> scheduler.AnnouncePeerResponse:
        with trio.move_on_after(self.config.schedule_timeout):
            answer = await stream.receive()
            if answer is None:
                raise SchedulerUnusable("the scheduler closed the stream")
            response: scheduler.AnnouncePeerResponse = answer
            return response
        raise SchedulerUnusable(f"no answer from the scheduler in {self.config.schedule_timeout:.0f} s")

    @staticmethod
    async def _close(stream: grpc_bridge.BidiStream) -> None:
        """Half-close, and let the scheduler end the call so the last report is delivered."""
        stream.done_writing()
        with trio.move_on_after(5):
            try:
                while await stream.receive() is not None:
                    pass
            except grpc.RpcError:
                pass

    @staticmethod
    def _send_started(reporter: report.SchedulerStream, started: bool) -> None:
        if not started:
            reporter.send(download_peer_started_request=scheduler.DownloadPeerStartedRequest())

    async def _from_parents(self, job: Job, parents: list[common.Peer], reporter: report.SchedulerStream,
                            first: bool) -> bool:
        collector = PieceCollector(self.storage, job.task_id, self.config.host_id, self._missing(job), parents,
                                   reporter, self.channels, concurrency=self.config.concurrent_pieces,
                                   timeout=self.config.piece_timeout, limiter=self.limiter, widen=first)
        complete = await collector.run()
        for parent_id, received in collector.parents.bytes_from.items():
            seed = collector.parents.peers[parent_id].host.type == HOST_TYPE_SEED
            self.counters["seed_bytes" if seed else "peer_bytes"] += received
        if not complete:
            reporter.send(reschedule_peer_request=scheduler.ReschedulePeerRequest(
                candidate_parents=collector.bad_parents,
                description=f"{len(collector.missing)} pieces missing from {len(parents)} parents"))
        return complete

    async def _from_source(self, job: Job, reporter: report.SchedulerStream) -> None:
        reporter.send(download_peer_back_to_source_started_request=scheduler.DownloadPeerBackToSourceStartedRequest())
        try:
            await self._source(job, self._missing(job), reporter)
        except (SourceFailed, StorageError) as exc:
            reporter.send(download_peer_back_to_source_failed_request=scheduler.DownloadPeerBackToSourceFailedRequest(
                description=str(exc)))
            raise
        reporter.send(download_peer_back_to_source_finished_request=
                      scheduler.DownloadPeerBackToSourceFinishedRequest())
