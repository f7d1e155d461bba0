"""Keeping the schedulers informed: AnnounceHost to every scheduler, and completed tasks announced again
whenever a scheduler is (re)gained, so a restarted peer or scheduler finds the swarm as it was."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import trio

from p2p import grpc_bridge
from p2p.api import common, scheduler, scheduler_stub
from p2p.config import PeerConfig
from p2p.reporter import SchedulerStream
from p2p.scheduler_ring import SchedulerRing
from p2p.storage import Storage, TaskInfo
from p2p.taskid import peer_id

log = logging.getLogger("lazyfs.peer")
RETRY_SECONDS = 2.0  # health checks, and announce retries while a scheduler is down
CALL_TIMEOUT = 10.0


class Announcer:
    """Keeps this host (and its completed tasks) known to every scheduler."""

    def __init__(self, config: PeerConfig, ring: SchedulerRing, storage: Storage, channels: grpc_bridge.ChannelPool,
                 host: Callable[[], common.Host]) -> None:
        self.config = config
        self.ring = ring
        self.storage = storage
        self.channels = channels
        self.host = host
        self.up: set[str] = set()

    async def run(self) -> None:
        """Announce to every scheduler now and every ``announce_interval``; health-check them in between, and
        announce again (host and tasks) to one that comes back."""
        last_round = -float("inf")
        while True:
            full = trio.current_time() - last_round >= self.config.announce_interval
            for target in self.config.schedulers:
                if full or target not in self.up:
                    await self.announce(target)
                elif not await grpc_bridge.serving(self.channels.get(target)):
                    log.warning("scheduler lost scheduler=%s", target)
                    self.up.discard(target)
            if full:
                last_round = trio.current_time()
            await trio.sleep(RETRY_SECONDS)

    def lost(self, target: str) -> None:
        """A call to *target* found it unreachable: announce again (host and tasks) once it answers."""
        if target in self.up:
            log.warning("scheduler lost scheduler=%s", target)
        self.up.discard(target)

    async def announce(self, target: str) -> bool:
        """AnnounceHost to *target*; on the first success after a loss, announce the completed tasks too."""
        stub = scheduler_stub(self.channels.get(target))
        request = scheduler.AnnounceHostRequest(host=self.host())
        request.interval.FromSeconds(int(self.config.announce_interval))
        try:
            await grpc_bridge.unary(stub.AnnounceHost, request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if target in self.up:
                log.warning("scheduler lost scheduler=%s code=%s", target, exc.code().name)
            self.up.discard(target)
            return False
        if target not in self.up:
            self.up.add(target)
            log.info("host announced scheduler=%s host_id=%s", target, self.config.host_id)
            await self._announce_tasks(target)
        return True

    async def _announce_tasks(self, target: str) -> None:
        """Tell *target* about every completed task it schedules (register, metadata only, finished)."""
        held = [t for t in self.storage.tasks() if t.state == "succeeded" and self.ring.pick(t.task_id) == target]
        for info in held:
            try:
                await self._announce_task(target, info)
            except grpc.RpcError as exc:
                log.warning("task announce failed task=%s scheduler=%s code=%s", info.task_id, target,
                            exc.code().name)
                return
        if held:
            log.info("tasks announced scheduler=%s count=%d", target, len(held))

    async def _announce_task(self, target: str, info: TaskInfo) -> None:
        download = common.Download()
        download.ParseFromString(info.download)
        download.metadata_only = True
        download.actual_content_length = info.content_length
        download.actual_piece_length = info.piece_length
        download.actual_piece_count = info.piece_count
        download.concurrent_piece_count = self.config.concurrent_pieces
        download.ClearField("output_path")
        stream = grpc_bridge.BidiStream(scheduler_stub(self.channels.get(target)).AnnouncePeer, timeout=CALL_TIMEOUT)
        reporter = SchedulerStream(stream, self.config.host_id, info.task_id,
                                   peer_id(self.config.ip, self.config.hostname, seed=self.config.seed))
        try:
            reporter.send(register_peer_request=scheduler.RegisterPeerRequest(download=download))
            await stream.receive()
            reporter.send(download_peer_started_request=scheduler.DownloadPeerStartedRequest())
            reporter.send(download_peer_finished_request=scheduler.DownloadPeerFinishedRequest())
            stream.done_writing()
            while await stream.receive() is not None:
                pass
        finally:
            stream.cancel()
