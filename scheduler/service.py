"""The ``scheduler.v2.Scheduler`` servicer: hosts, peers and tasks (protocol doc §2.3, §2.4).

Handlers run on grpcio's worker threads; every read or write of the resource model holds its lock.
Preheat RPCs delegate to :mod:`scheduler.preheat`; cache and persistent RPCs keep the base class's UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2

from p2p.api import common, scheduler, scheduler_grpc
from scheduler import logfmt
from scheduler.config import SchedulerConfig
from scheduler.convert import peer_proto, task_proto
from scheduler.errors import ServiceError
from scheduler.preheat import Preheater, trailing_metadata
from scheduler.resources import Host, Peer, Resources, Task
from scheduler.scheduling import Scheduling
from scheduler.seeding import SeedTrigger
from scheduler.stream import PeerStream

log = logging.getLogger(__name__)
T = TypeVar("T")


def _abort(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ServiceError as exc:
        context.abort(exc.code, exc.message)


class SchedulerService(scheduler_grpc.SchedulerServicer):
    """Dragonfly's v2 scheduler RPCs for standard tasks."""

    def __init__(self, resources: Resources, config: SchedulerConfig, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.resources = resources
        self.config = config
        self.clock = clock
        self.scheduling = Scheduling(resources, config, sleep=sleep)
        self.seeds = SeedTrigger(resources, config, clock)
        self.preheater = Preheater(resources, config)

    # Hosts

    def AnnounceHost(self, request: scheduler.AnnounceHostRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Create or refresh a host; INVALID_ARGUMENT without a host id."""
        if not request.HasField("host") or not request.host.id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host.id is required")
        with self.resources.lock:
            self.resources.announce_host(request.host, self.clock())
        logfmt.log(log, logging.DEBUG, "announce_host", host=request.host.id, type=request.host.type)
        return empty_pb2.Empty()

    def ListHosts(self, request: empty_pb2.Empty, context: grpc.ServicerContext) -> scheduler.ListHostsResponse:
        """Every announced host."""
        with self.resources.lock:
            return scheduler.ListHostsResponse(hosts=[h.proto for h in self.resources.hosts.values()])

    def DeleteHost(self, request: scheduler.DeleteHostRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Remove a host and all its peers."""
        with self.resources.lock:
            host = _abort(context, lambda: self.host(request.host_id))
            self.resources.delete_host(host)
        logfmt.log(log, logging.INFO, "delete_host", host=request.host_id)
        return empty_pb2.Empty()

    # Peers and tasks

    def StatPeer(self, request: scheduler.StatPeerRequest, context: grpc.ServicerContext) -> common.Peer:
        """A peer with its pieces, task and host."""
        with self.resources.lock:
            return peer_proto(_abort(context, lambda: self.peer(request.task_id, request.peer_id)))

    def DeletePeer(self, request: scheduler.DeletePeerRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Remove a peer and its edges."""
        with self.resources.lock:
            self.resources.delete_peer(_abort(context, lambda: self.peer(request.task_id, request.peer_id)))
        return empty_pb2.Empty()

    def StatTask(self, request: scheduler.StatTaskRequest, context: grpc.ServicerContext) -> common.Task:
        """A task's layout, state, peer count, availability and pieces."""
        with self.resources.lock:
            return task_proto(_abort(context, lambda: self.task(request.task_id)))

    def DeleteTask(self, request: scheduler.DeleteTaskRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Remove the peers of the task on the requesting host (the client's storage GC calls this)."""
        with self.resources.lock:
            task = _abort(context, lambda: self.task(request.task_id))
            host = _abort(context, lambda: self.host(request.host_id))
            for peer in [p for p in task.peers.values() if p.host is host]:
                self.resources.delete_peer(peer)
        return empty_pb2.Empty()

    def AnnouncePeer(self, request_iterator: Iterator[scheduler.AnnouncePeerRequest],
                     context: grpc.ServicerContext) -> Iterator[scheduler.AnnouncePeerResponse]:
        """One peer's download, from Register to a terminal message (see :class:`PeerStream`)."""
        stream = PeerStream(self, context.is_active)
        try:
            yield from stream.run(request_iterator)
        except ServiceError as exc:
            logfmt.log(log, logging.INFO, "announce_peer_refused", peer=stream.peer_id, code=exc.code.name,
                       error=exc.message)
            context.abort(exc.code, exc.message)
        except grpc.RpcError:  # the client went away while we waited for its next message
            return
        finally:
            stream.close()

    # Preheat (protocol doc §5.1)

    def PreheatImage(self, request: scheduler.PreheatImageRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Resolve an image's manifest and have seed peers download its config and layer blobs."""
        summary = _abort(context, lambda: self.preheater.preheat_image(request))
        context.set_trailing_metadata(trailing_metadata(summary))
        return empty_pb2.Empty()

    def PreheatFile(self, request: scheduler.PreheatFileRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Have seed peers download one URL."""
        summary = _abort(context, lambda: self.preheater.preheat_file(request))
        context.set_trailing_metadata(trailing_metadata(summary))
        return empty_pb2.Empty()

    # Lookups for handlers (lock held)

    def host(self, host_id: str) -> Host:
        """The host, or NOT_FOUND."""
        host = self.resources.hosts.get(host_id)
        if host is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"host {host_id} not found")
        return host

    def task(self, task_id: str) -> Task:
        """The task, or NOT_FOUND."""
        task = self.resources.tasks.get(task_id)
        if task is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        return task

    def peer(self, task_id: str, peer_id: str) -> Peer:
        """The peer of the task, or NOT_FOUND."""
        peer = self.resources.find_peer(task_id, peer_id)
        if peer is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"peer {peer_id} not found")
        return peer

    def route_new_task(self, task: Task, host: Host, peer_id: str, download: common.Download) -> bool:
        """For a register that finds no available peer: trigger a seed, or say whether to go back to source.

        LEVEL1 is forbidden, LEVEL2 gets NOT_FOUND, LEVEL3 goes to source; the other priorities trigger the
        task's seed, falling back to source without seeds or after a recent seed failure (lock held).
        """
        peer = task.peers.get(peer_id)
        wanted = peer.wanted_pieces() if peer is not None else None
        if host.is_seed or (task.seed_in_flight and wanted is None) or task.has_available_peer(peer_id, wanted):
            return False
        priority = download.priority
        if priority == common.Priority.LEVEL1:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "LEVEL1 peer is forbidden")
        if priority == common.Priority.LEVEL2:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, "LEVEL2 peer not found candidate peers")
        if priority == common.Priority.LEVEL3 or task.seed_failed(self.clock(), self.config.seed_failed_timeout):
            return True
        seed = self.seeds.pick(task.id)
        if seed is None:
            return True
        self.seeds.start(task, seed, download)
        return False

