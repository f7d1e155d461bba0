"""The peer daemon (Dragonfly's dfdaemon): one trio process serving pieces over Vortex, DfdaemonUpload on its
gRPC port, DfdaemonDownload on a unix socket and Prometheus metrics over HTTP; announcing itself to the
schedulers, downloading for local clients and, as a seed peer, for the scheduler; collecting garbage."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
import trio

from lazyfs import metrics
from lazyfs.fuse.api import ApiServer, Reply
from p2p import grpc_bridge
from p2p.announcer import Announcer
from p2p.api import common, dfdaemon_grpc, scheduler, scheduler_stub
from p2p.config import PeerConfig
from p2p.download import Downloader
from p2p.download_service import DownloadService
from p2p.host import describe
from p2p.piece_server import UploadStats, serve_pieces
from p2p.proxy import Proxy
from p2p.ratelimit import RateLimiter
from p2p.scheduler_ring import SchedulerRing
from p2p.storage import Storage
from p2p.tls import origin_context
from p2p.upload_service import UploadService
from seed.origin import Origin

log = logging.getLogger("lazyfs.peer")


class Peer:
    """A running peer daemon's parts, for its services and for tests."""

    def __init__(self, config: PeerConfig, storage: Storage, downloader: Downloader, stats: UploadStats,
                 grpc_port: int, vortex_port: int) -> None:
        self.config = config
        self.storage = storage
        self.downloader = downloader
        self.stats = stats
        self.grpc_port = grpc_port
        self.vortex_port = vortex_port
        self.proxy: Proxy | None = None
        self.proxy_port = 0

    def host(self) -> common.Host:
        """This host as announced, with its current upload rate."""
        return describe(self.config, self.stats.rate(), grpc_port=self.grpc_port,
                        proxy_port=self.proxy_port)

    def metrics(self) -> str:
        """Prometheus text."""
        values: dict[str, int | float] = {**self.downloader.counters, "upload_bytes": self.stats.bytes_sent,
                                          "active_uploads": self.stats.active, "tasks": len(self.storage.tasks())}
        if self.proxy is not None:
            values.update(self.proxy.counters)
        lines = metrics.counters("lazyfs_peer", values, {"host_id": self.config.host_id},
                                 gauges=("active_uploads", "tasks"))
        return "\n".join(lines) + "\n"


def _start_grpc(address: str, servicer: Any, add: Callable[[Any, grpc.Server], None]) -> tuple[grpc.Server, int]:
    return grpc_bridge.serve(address, lambda server: add(servicer, server))


async def _collect_garbage(peer: Peer, channels: grpc_bridge.ChannelPool, ring: SchedulerRing) -> None:
    config = peer.config
    while True:
        await trio.sleep(config.gc_interval)
        deleted = peer.storage.collect_garbage(ttl=config.task_ttl, high_percent=config.disk_high_percent,
                                               low_percent=config.disk_low_percent, capacity=config.disk_capacity)
        for task_id in deleted:
            log.info("task evicted task=%s", task_id)
            if ring:
                stub = scheduler_stub(channels.get(ring.pick(task_id)))
                try:
                    await grpc_bridge.unary(stub.DeleteTask, scheduler.DeleteTaskRequest(
                        host_id=config.host_id, task_id=task_id), timeout=10)
                except grpc.RpcError as exc:
                    log.warning("scheduler delete-task failed task=%s code=%s", task_id, exc.code().name)


async def serve(config: PeerConfig, *, task_status: trio.TaskStatus[Peer] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled."""
    storage = Storage(config.data_dir)
    channels = grpc_bridge.ChannelPool()
    ring = SchedulerRing(config.schedulers)
    stats = UploadStats()
    servers: list[grpc.Server] = []
    try:
        async with Origin(timeout=config.source_timeout, retries=config.source_retries,
                          limiter=RateLimiter(config.back_to_source_limit),
                          verify=origin_context(config.origin_ca_bundle)) as origin, \
                trio.open_nursery() as nursery:
            vortex_port = await nursery.start(lambda task_status: serve_pieces(
                storage, config.listen, config.vortex_port, limiter=RateLimiter(config.upload_limit),
                max_uploads=config.max_uploads, stats=stats, super_seed=config.seed, task_status=task_status))
            downloader = Downloader(config, storage, origin, ring, channels, nursery)
            portal = grpc_bridge.Portal(nursery)
            peer = Peer(config, storage, downloader, stats, 0, vortex_port)
            upload = UploadService(portal, downloader, peer.host, ip=config.ip, vortex_port=vortex_port)
            server, peer.grpc_port = _start_grpc(f"{config.listen}:{config.grpc_port}", upload,
                                                 dfdaemon_grpc.add_DfdaemonUploadServicer_to_server)
            servers.append(server)
            config.socket.parent.mkdir(parents=True, exist_ok=True)
            config.socket.unlink(missing_ok=True)
            server, _ = _start_grpc(f"unix:{config.socket}", DownloadService(portal, downloader),
                                    dfdaemon_grpc.add_DfdaemonDownloadServicer_to_server)
            servers.append(server)
            if config.metrics_port:
                api = ApiServer({("GET", "/metrics"): lambda _: _metrics(peer)})
                await nursery.start(api.serve_tcp, config.listen, config.metrics_port)
            if config.proxy_port:
                peer.proxy = Proxy(config, downloader, storage)
                peer.proxy_port = await nursery.start(peer.proxy.serve, config.proxy_listen, config.proxy_port)
            announcer = Announcer(config, ring, storage, channels, peer.host)
            downloader.announcer = announcer
            nursery.start_soon(announcer.run)
            nursery.start_soon(_collect_garbage, peer, channels, ring)
            log.info("peer ready host_id=%s seed=%s grpc_port=%d vortex_port=%d socket=%s schedulers=%s proxy_port=%d",
                     config.host_id, config.seed, peer.grpc_port, vortex_port, config.socket,
                     ",".join(config.schedulers) or "-", peer.proxy_port)
            task_status.started(peer)
            await trio.sleep_forever()
    finally:
        for server in servers:
            server.stop(grace=1)
        channels.close()
        storage.close()


async def _metrics(peer: Peer) -> Reply:
    return Reply(200, peer.metrics().encode(), "text/plain; version=0.0.4")


async def _until_signalled(config: PeerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, config)
            async for signum in signals:
                log.info("peer stopping signal=%s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


def run(config: PeerConfig) -> None:
    """The ``lazyfs peer`` entry point: serve until SIGTERM or SIGINT."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per origin request is too many
    trio.run(_until_signalled, config)
