"""Conformance of the scheduler (scheduler/) against a scripted Dragonfly v2 client over real gRPC."""

from __future__ import annotations

import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from p2p.api import HOST_TYPE_SEED, common, dfdaemon, dfdaemon_grpc, scheduler, scheduler_grpc
from p2p.grpc_bridge import channel, healthy, serve
from p2p.scheduler_ring import HashRing
from scheduler import evaluator
from scheduler.config import SchedulerConfig, load_config
from scheduler.gc import Collector, collect
from scheduler.resources import CycleError, Host, Peer, PeerState, PieceRecord, Resources, Task
from scheduler.seeding import SeedTrigger
from scheduler.server import SchedulerState, start
from scheduler.stream import layout

MiB = 1 << 20
PIECE = 4 * MiB
CONTENT = 4 * PIECE + 100  # 5 pieces, the last one 100 bytes
URL = "https://registry.example/v2/library/app/blobs/sha256:" + "ab" * 32
FAST = {"listen": "127.0.0.1:0", "retry_interval": 0.02, "retry_limit": 5, "retry_back_to_source_limit": 4,
        "gc_interval": 3600.0, "workers": 64}


# Helpers


def host_proto(host_id: str, *, seed: bool = False, port: int = 4000, idc: str = "", location: str = "",
               max_tx: int = 10_000_000_000, disable_shared: bool = False) -> common.Host:
    network = common.Network(max_tx_bandwidth=max_tx, tx_bandwidth=0)
    if idc:
        network.idc = idc
    if location:
        network.location = location
    return common.Host(id=host_id, type=HOST_TYPE_SEED if seed else 0, hostname=host_id, ip="127.0.0.1", port=port,
                       download_port=port, network=network, disable_shared=disable_shared)


def download(*, content: int = CONTENT, piece: int = PIECE, **fields: Any) -> common.Download:
    d = common.Download(url=URL, concurrent_piece_count=8, **fields)
    d.actual_content_length = content
    d.actual_piece_length = piece
    d.actual_piece_count = -(-content // piece)
    return d


def piece_msg(number: int, *, parent_id: str | None = None, cost: float = 0.1) -> common.Piece:
    piece = common.Piece(number=number, offset=number * PIECE, length=min(PIECE, CONTENT - number * PIECE),
                         digest="crc32:1")
    if parent_id is not None:
        piece.parent_id = parent_id
        piece.traffic_type = common.TrafficType.REMOTE_PEER
    else:
        piece.traffic_type = common.TrafficType.BACK_TO_SOURCE
    piece.cost.FromNanoseconds(int(cost * 1e9))
    return piece


class PeerClient:
    """One scripted AnnouncePeer stream."""

    def __init__(self, stub: Any, host_id: str, peer_id: str, task_id: str = "t" * 64) -> None:
        self.ids: dict[str, Any] = {"host_id": host_id, "task_id": task_id, "peer_id": peer_id}
        self.peer_id = peer_id
        self._requests: queue.SimpleQueue[scheduler.AnnouncePeerRequest | None] = queue.SimpleQueue()
        self._call = stub.AnnouncePeer(iter(self._requests.get, None), timeout=20)

    def send(self, **message: Any) -> None:
        self._requests.put(scheduler.AnnouncePeerRequest(**{**self.ids, **message}))

    def raw(self, request: scheduler.AnnouncePeerRequest) -> None:
        self._requests.put(request)

    def register(self, dl: common.Download) -> None:
        self.send(register_peer_request=scheduler.RegisterPeerRequest(download=dl))

    def recv(self) -> scheduler.AnnouncePeerResponse:
        response: scheduler.AnnouncePeerResponse = next(self._call)
        return response

    def recv_kind(self) -> str:
        return str(self.recv().WhichOneof("response"))

    def end(self) -> grpc.StatusCode:
        """Drain the call and return its final status code."""
        try:
            for _ in self._call:
                pass
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def error(self) -> tuple[grpc.StatusCode, str]:
        try:
            for _ in self._call:
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def cancel(self) -> None:
        self._call.cancel()

    def started(self) -> None:
        self.send(download_peer_started_request=scheduler.DownloadPeerStartedRequest())

    def source_started(self) -> None:
        self.send(download_peer_back_to_source_started_request=scheduler.DownloadPeerBackToSourceStartedRequest())

    def source_piece(self, number: int) -> None:
        msg = scheduler.DownloadPieceBackToSourceFinishedRequest(piece=piece_msg(number))
        self.send(download_piece_back_to_source_finished_request=msg)

    def peer_piece(self, number: int, parent_id: str) -> None:
        msg = scheduler.DownloadPieceFinishedRequest(piece=piece_msg(number, parent_id=parent_id))
        self.send(download_piece_finished_request=msg)

    def finished(self) -> None:
        self.send(download_peer_finished_request=scheduler.DownloadPeerFinishedRequest())

    def source_finished(self) -> None:
        self.send(download_peer_back_to_source_finished_request=scheduler.DownloadPeerBackToSourceFinishedRequest())

    def reschedule(self, *bad: str) -> None:
        msg = scheduler.ReschedulePeerRequest(candidate_parents=[common.Peer(id=b) for b in bad], description="bad")
        self.send(reschedule_peer_request=msg)


class Cluster:
    """A scheduler in-process plus a client stub."""

    def __init__(self, **overrides: Any) -> None:
        self.server, self.port, self.state = start(SchedulerConfig(**{**FAST, **overrides}))
        self.target = f"127.0.0.1:{self.port}"
        self.channel = channel(self.target)
        self.stub = scheduler_grpc.SchedulerStub(self.channel)  # type: ignore[no-untyped-call]
        self.clients: list[PeerClient] = []

    def announce(self, host_id: str, **kw: Any) -> None:
        self.stub.AnnounceHost(scheduler.AnnounceHostRequest(host=host_proto(host_id, **kw)), timeout=5)

    def peer(self, host_id: str, peer_id: str, task_id: str = "t" * 64) -> PeerClient:
        self.clients.append(PeerClient(self.stub, host_id, peer_id, task_id))  # alive until close: GC would cancel
        return self.clients[-1]

    def stat_task(self, task_id: str = "t" * 64) -> common.Task:
        task: common.Task = self.stub.StatTask(scheduler.StatTaskRequest(task_id=task_id), timeout=5)
        return task

    def stat_peer(self, peer_id: str, task_id: str = "t" * 64) -> common.Peer:
        peer: common.Peer = self.stub.StatPeer(scheduler.StatPeerRequest(task_id=task_id, peer_id=peer_id), timeout=5)
        return peer

    def close(self) -> None:
        self.channel.close()
        self.state.stop(self.server, 0)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def cluster_factory() -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**overrides: Any) -> Cluster:
        made.append(Cluster(**overrides))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory()


def source_peer(cluster: Cluster, host_id: str, peer_id: str, pieces: range = range(5), **host: Any) -> PeerClient:
    """A peer (on a host announced with *host* options) sent back to source, started, with *pieces* fetched."""
    cluster.announce(host_id, **host)
    client = cluster.peer(host_id, peer_id)
    client.register(download(need_back_to_source=True))
    assert client.recv_kind() == "need_back_to_source_response"
    client.source_started()
    for n in pieces:
        client.source_piece(n)
    wait_for(lambda: len(cluster.stat_peer(peer_id).pieces) == len(pieces)
             and cluster.stat_peer(peer_id).state == "BackToSource")
    return client


def peer_state(cluster: Cluster, peer_id: str) -> str:
    return cluster.stat_peer(peer_id).state


# A fake seed peer: DfdaemonUpload.DownloadTask that registers with the scheduler as a back-to-source peer


class FakeSeed(dfdaemon_grpc.DfdaemonUploadServicer):
    def __init__(self, scheduler_target: str, host_id: str) -> None:
        self.requests: list[dfdaemon.DownloadTaskRequest] = []
        self.release = threading.Event()
        self.first_pieces = threading.Event()
        self._stub = scheduler_grpc.SchedulerStub(channel(scheduler_target))  # type: ignore[no-untyped-call]
        self._host_id = host_id

    def DownloadTask(self, request: dfdaemon.DownloadTaskRequest, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        task_id = "t" * 64
        client = PeerClient(self._stub, self._host_id, f"{self._host_id}-peer-seed", task_id)
        client.register(request.download)
        assert client.recv_kind() == "need_back_to_source_response"
        client.source_started()
        client.source_piece(0)
        client.source_piece(1)
        self.first_pieces.set()
        yield dfdaemon.DownloadTaskResponse(host_id=self._host_id, task_id=task_id, peer_id=client.peer_id)
        self.release.wait(10)
        for n in range(2, 5):
            client.source_piece(n)
        client.source_finished()
        assert client.end() == grpc.StatusCode.OK


@pytest.fixture
def seeded(cluster_factory: Callable[..., Cluster]) -> Iterator[tuple[Cluster, FakeSeed]]:
    cluster = cluster_factory(retry_back_to_source_limit=200, retry_limit=250)
    seed = FakeSeed(cluster.target, "seed-host")
    add = dfdaemon_grpc.add_DfdaemonUploadServicer_to_server
    server, port = serve("127.0.0.1:0", lambda s: add(seed, s), workers=8)  # type: ignore[no-untyped-call]
    cluster.announce("seed-host", seed=True, port=port)
    yield cluster, seed
    seed.release.set()
    server.stop(0).wait()


# Service basics


def test_health_serving(cluster: Cluster) -> None:
    assert healthy(cluster.target)


def test_announce_peer_needs_announced_host(cluster: Cluster) -> None:
    client = cluster.peer("nobody", "p1")
    client.register(download())
    code, details = client.error()
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "host nobody not found"


def test_announce_host_requires_id(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.AnnounceHost(scheduler.AnnounceHostRequest(host=common.Host()), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_and_delete_hosts(cluster: Cluster) -> None:
    cluster.announce("h1")
    cluster.announce("h2", seed=True)
    source_peer(cluster, "h1", "p1")
    listed = cluster.stub.ListHosts(empty_pb2.Empty(), timeout=5)
    assert sorted(h.id for h in listed.hosts) == ["h1", "h2"]
    cluster.stub.DeleteHost(scheduler.DeleteHostRequest(host_id="h1"), timeout=5)
    assert [h.id for h in cluster.stub.ListHosts(empty_pb2.Empty(), timeout=5).hosts] == ["h2"]
    assert cluster.stat_task().peer_count == 0
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.DeleteHost(scheduler.DeleteHostRequest(host_id="h1"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stat_and_delete_unknown(cluster: Cluster) -> None:
    for call in (lambda: cluster.stat_task("x" * 64), lambda: cluster.stat_peer("nope")):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unimplemented_rpc(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.StatCacheTask(scheduler.StatCacheTaskRequest(task_id="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# Seed triggering and normal scheduling


def test_seed_trigger_then_peer_downloads_from_seed(seeded: tuple[Cluster, FakeSeed]) -> None:
    cluster, seed = seeded
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    dl = download()
    dl.output_path = "/tmp/out"
    dl.request_header["Authorization"] = "Bearer x"
    client.register(dl)
    response = client.recv()
    assert response.WhichOneof("response") == "normal_task_response"
    [parent] = response.normal_task_response.candidate_parents
    assert parent.id == "seed-host-peer-seed"
    assert parent.host.id == "seed-host"
    assert parent.state == "BackToSource"
    assert {p.number for p in parent.pieces} <= {0, 1}
    assert parent.task.request_header["Authorization"] == "Bearer x"

    [request] = seed.requests
    assert request.download.need_back_to_source
    assert not request.download.HasField("output_path")
    assert request.download.url == URL
    assert request.download.request_header["Authorization"] == "Bearer x"

    seed_host = cluster.state.resources.hosts["seed-host"]
    assert seed_host.edge_tx_bandwidth == PIECE * 8 * 8
    assert seed_host.concurrent_upload_piece_count == 8
    assert seed_host.upload_content_length == CONTENT

    client.started()
    for n in range(2):
        client.peer_piece(n, parent.id)
    wait_for(lambda: len(cluster.stat_peer("p1").pieces) == 2)
    stat = cluster.stat_peer("p1")
    assert stat.state == "Running"
    assert stat.pieces[0].parent_id == parent.id
    assert stat.pieces[0].cost.ToNanoseconds() == 100_000_000
    assert seed_host.upload_count == 2

    seed.release.set()
    wait_for(lambda: cluster.stat_task().state == "Succeeded")
    for n in range(2, 5):
        client.peer_piece(n, parent.id)
    client.finished()
    assert client.end() == grpc.StatusCode.OK
    task = cluster.stat_task()
    assert (task.state, task.content_length, task.piece_count, task.peer_count) == ("Succeeded", CONTENT, 5, 2)
    assert [p.number for p in task.pieces] == [0, 1, 2, 3, 4]
    assert task.has_available_peer
    assert seed_host.edge_tx_bandwidth == 0 and seed_host.concurrent_upload_piece_count == 0
    wait_for(lambda: not cluster.state.resources.tasks["t" * 64].seed_in_flight)


def test_seed_triggered_once_per_task(seeded: tuple[Cluster, FakeSeed]) -> None:
    cluster, seed = seeded
    clients = []
    for i in range(3):
        cluster.announce(f"h{i}")
        clients.append(cluster.peer(f"h{i}", f"p{i}"))
        clients[-1].register(download())
    for c in clients:
        assert c.recv_kind() == "normal_task_response"
    assert len(seed.requests) == 1


def test_seed_picked_by_consistent_hash() -> None:
    resources = Resources()
    for i in range(4):
        resources.announce_host(host_proto(f"seed{i}", seed=True), 0.0)
    resources.announce_host(host_proto("normal"), 0.0)
    trigger = SeedTrigger(resources, SchedulerConfig())
    ring = HashRing([f"seed{i}" for i in range(4)])
    ids = [f"{i:064x}" for i in range(200)]
    picks = [trigger.pick(t) for t in ids]
    assert [h.id if h else None for h in picks] == [ring.node_for(t) for t in ids]
    assert len({h.id for h in picks if h}) == 4
    assert SeedTrigger(Resources(), SchedulerConfig()).pick(ids[0]) is None


def test_failed_seed_trigger_sends_peers_to_source(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(retry_back_to_source_limit=10, retry_limit=12, retry_interval=0.05)
    cluster.announce("seed", seed=True, port=1)  # nothing listens there
    cluster.announce("h1")
    first = cluster.peer("h1", "p1")
    first.register(download())
    assert first.recv_kind() == "need_back_to_source_response"  # after RetryBackToSourceLimit rounds
    task = cluster.state.resources.tasks["t" * 64]
    wait_for(lambda: task.seed_failed_at is not None)
    first.cancel()
    wait_for(lambda: task.peers["p1"].state is PeerState.FAILED)
    cluster.announce("h2")
    second = cluster.peer("h2", "p2")
    second.register(download())
    response = second.recv()
    assert response.need_back_to_source_response.description == "peer needs back-to-source"


def test_reschedule_blocks_parent(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    source_peer(cluster, "h1", "p1")
    cluster.announce("h2", idc="idc-a")
    child = cluster.peer("h2", "p2")
    child.register(download())
    first = child.recv().normal_task_response
    assert sorted(p.id for p in first.candidate_parents) == ["p0", "p1"]
    child.started()
    child.reschedule("p1")
    second = child.recv().normal_task_response
    assert [p.id for p in second.candidate_parents] == ["p0"]
    task = cluster.state.resources.tasks["t" * 64]
    assert task.parents_of("p2") == {"p0"}
    child.reschedule("p0")
    assert child.recv_kind() == "need_back_to_source_response"


def test_temporary_piece_failure_blocks_parent(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    source_peer(cluster, "h1", "p1")
    cluster.announce("h2")
    child = cluster.peer("h2", "p2")
    child.register(download())
    assert child.recv_kind() == "normal_task_response"
    child.started()
    msg = scheduler.DownloadPieceFailedRequest(piece_number=3, parent_id="p1", temporary=True)
    child.send(download_piece_failed_request=msg)
    child.send(download_piece_failed_request=scheduler.DownloadPieceFailedRequest(piece_number=3, parent_id="p0"))
    child.reschedule()
    assert [p.id for p in child.recv().normal_task_response.candidate_parents] == ["p0"]
    hosts = cluster.state.resources.hosts
    assert (hosts["h1"].upload_failed_count, hosts["h0"].upload_failed_count) == (1, 0)


def test_candidate_parent_limit_and_score_order(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(candidate_parent_limit=2)
    cluster.announce("child", idc="IDC1", location="cn|sh|a")
    hosts: dict[str, dict[str, Any]] = {
        "far": {}, "near": {"idc": "idc1", "location": "cn|sh|a"}, "mid": {"location": "cn|sh|b"}}
    for name, kw in hosts.items():
        source_peer(cluster, name, f"peer-{name}", **kw)
    child = cluster.peer("child", "c")
    child.register(download())
    parents = [p.id for p in child.recv().normal_task_response.candidate_parents]
    assert parents == ["peer-near", "peer-mid"]


def test_disable_shared_and_own_host_are_skipped(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    cluster.announce("h0", disable_shared=True)
    source_peer(cluster, "h1", "p1")
    child = cluster.peer("h1", "p2")  # same host as p1
    child.register(download())
    assert child.recv_kind() == "need_back_to_source_response"


def test_back_to_source_failed_fails_task(cluster: Cluster) -> None:
    src = source_peer(cluster, "h0", "p0")
    cluster.announce("h1")
    child = cluster.peer("h1", "p1")
    child.register(download())
    assert child.recv_kind() == "normal_task_response"
    src.send(download_peer_back_to_source_failed_request=scheduler.DownloadPeerBackToSourceFailedRequest())
    assert src.end() == grpc.StatusCode.OK
    task = cluster.stat_task()
    assert (task.state, task.content_length, task.piece_count) == ("Failed", 0, 0)
    assert cluster.state.resources.tasks["t" * 64].edges() == []


def test_task_succeeds_when_a_peer_has_all_pieces(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")  # never finishes
    children = []
    for i in (1, 2):
        cluster.announce(f"h{i}")
        children.append(cluster.peer(f"h{i}", f"p{i}"))
        children[-1].register(download())
        assert children[-1].recv_kind() == "normal_task_response"
        children[-1].started()
    partial, full = children
    for n in range(3):
        partial.peer_piece(n, "p0")
    partial.finished()
    assert partial.end() == grpc.StatusCode.OK
    assert cluster.stat_task().state == "Running"
    for n in range(5):
        full.peer_piece(n, "p0")
    full.finished()
    assert full.end() == grpc.StatusCode.OK
    assert cluster.stat_task().state == "Succeeded"
    assert cluster.state.resources.hosts["h0"].upload_count == 8


def test_pieces_held_by_other_peers_of_the_host_count_for_a_ranged_child(cluster: Cluster) -> None:
    cluster.announce("h0")
    first = cluster.peer("h0", "a")  # an earlier ranged download stored pieces 0 and 1 on h0
    first.register(download(need_back_to_source=True, range=common.Range(start=0, length=2 * PIECE)))
    assert first.recv_kind() == "need_back_to_source_response"
    first.source_started()
    first.source_piece(0)
    first.source_piece(1)
    first.source_finished()
    assert first.end() == grpc.StatusCode.OK
    second = cluster.peer("h0", "b")  # now fetching pieces 2 and 3
    second.register(download(need_back_to_source=True, range=common.Range(start=2 * PIECE, length=2 * PIECE)))
    assert second.recv_kind() == "need_back_to_source_response"
    second.source_started()
    wait_for(lambda: peer_state(cluster, "b") == "BackToSource")
    cluster.announce("h1")
    child = cluster.peer("h1", "c")  # wants pieces 1 and 2: h0 holds one, b fetches the other
    child.register(download(range=common.Range(start=PIECE + 10, length=PIECE)))
    assert [p.id for p in child.recv().normal_task_response.candidate_parents] == ["b"]


def test_ranged_source_peer_does_not_succeed_task(cluster: Cluster) -> None:
    cluster.announce("h0")
    client = cluster.peer("h0", "p0")
    client.register(download(need_back_to_source=True, range=common.Range(start=0, length=10)))
    assert client.recv_kind() == "need_back_to_source_response"
    client.source_started()
    client.source_finished()
    assert client.end() == grpc.StatusCode.OK
    assert cluster.stat_peer("p0").state == "Succeeded"
    assert cluster.stat_task().state == "Running"


# Register variants


def test_empty_task(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(content=0))
    assert client.recv_kind() == "empty_task_response"
    client.started()
    client.finished()
    assert client.end() == grpc.StatusCode.OK
    task = cluster.stat_task()
    assert (task.state, task.size_scope, task.piece_count) == ("Succeeded", common.SizeScope.EMPTY, 0)


def test_metadata_only(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(metadata_only=True))
    assert client.recv_kind() == "metadata_only_response"
    client.started()
    client.finished()
    assert client.end() == grpc.StatusCode.OK
    assert cluster.stat_peer("p1").state == "Succeeded"
    assert cluster.stat_task().state == "Succeeded"
    cluster.announce("h2")
    child = cluster.peer("h2", "p2")
    child.register(download())
    assert [p.id for p in child.recv().normal_task_response.candidate_parents] == ["p1"]


@pytest.mark.parametrize(("priority", "code", "details"), [
    (common.Priority.LEVEL1, grpc.StatusCode.FAILED_PRECONDITION, "LEVEL1 peer is forbidden"),
    (common.Priority.LEVEL2, grpc.StatusCode.NOT_FOUND, "LEVEL2 peer not found candidate peers"),
])
def test_refused_priorities(cluster: Cluster, priority: int, code: grpc.StatusCode, details: str) -> None:
    cluster.announce("seed", seed=True, port=1)
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(priority=priority))
    assert client.error() == (code, details)
    assert cluster.stat_task().peer_count == 0


def test_level3_goes_to_source_without_seed_trigger(cluster: Cluster) -> None:
    cluster.announce("seed", seed=True, port=1)
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(priority=common.Priority.LEVEL3))
    assert client.recv_kind() == "need_back_to_source_response"
    task = cluster.state.resources.tasks["t" * 64]
    assert not task.seed_in_flight and task.seed_failed_at is None


def test_level2_joins_an_existing_task(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(priority=common.Priority.LEVEL2))
    assert client.recv_kind() == "normal_task_response"


def test_no_seed_sends_first_peer_to_source(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download())
    assert client.recv_kind() == "need_back_to_source_response"


def test_back_to_source_limit(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(back_to_source_count=1)
    source_peer(cluster, "h0", "p0", pieces=range(0))
    cluster.announce("h1")
    waiting = cluster.peer("h1", "p1")
    waiting.register(download(need_back_to_source=True))
    assert waiting.recv_kind() == "normal_task_response"  # p0 is fetching from source: it is the parent
    cluster.announce("h2")
    lone = cluster.peer("h2", "p2", task_id="u" * 64)
    lone.register(download(need_back_to_source=True))
    assert lone.recv_kind() == "need_back_to_source_response"
    cluster.announce("h3")
    late = cluster.peer("h3", "p3", task_id="u" * 64)
    late.register(download(need_back_to_source=True))  # over the limit, and p2 has not started: no parent
    assert late.error() == (grpc.StatusCode.FAILED_PRECONDITION, "scheduling exceeded RetryLimit")


# Malformed and out-of-order streams


def test_first_message_must_be_register(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.started()
    code, details = client.error()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "register_peer_request" in details


def test_first_message_without_oneof(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.send()
    assert client.end() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("bad", [
    scheduler.RegisterPeerRequest(),
    scheduler.RegisterPeerRequest(download=common.Download(url="")),
    scheduler.RegisterPeerRequest(download=common.Download(url=URL, type=common.TaskType.PERSISTENT)),
    scheduler.RegisterPeerRequest(download=common.Download(url=URL, concurrent_piece_count=0)),
    scheduler.RegisterPeerRequest(download=common.Download(url=URL, actual_content_length=10 * MiB,
                                                           actual_piece_length=4 * MiB, actual_piece_count=2)),
    scheduler.RegisterPeerRequest(download=common.Download(url=URL, actual_content_length=10,
                                                           actual_piece_length=0)),
    scheduler.RegisterPeerRequest(download=common.Download(url=URL, metadata_only=True)),
])
def test_bad_register(cluster: Cluster, bad: scheduler.RegisterPeerRequest) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.send(register_peer_request=bad)
    assert client.end() == grpc.StatusCode.INVALID_ARGUMENT
    assert healthy(cluster.target)


def test_register_without_ids(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "")
    client.register(download())
    assert client.end() == grpc.StatusCode.INVALID_ARGUMENT


def test_register_with_conflicting_layout(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    cluster.announce("h1")
    client = cluster.peer("h1", "p1")
    client.register(download(content=CONTENT + 1))
    assert client.end() == grpc.StatusCode.FAILED_PRECONDITION


def test_duplicate_peer_id(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    again = cluster.peer("h0", "p0")
    again.register(download())
    assert again.end() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("field", ["host_id", "task_id", "peer_id"])
def test_mismatched_ids(cluster: Cluster, field: str) -> None:
    client = source_peer(cluster, "h1", "p1", pieces=range(0))
    request = scheduler.AnnouncePeerRequest(
        **{**client.ids, field: "other"},
        download_peer_started_request=scheduler.DownloadPeerStartedRequest())
    client.raw(request)
    code, details = client.error()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details
    assert peer_state(cluster, "p1") == "Failed"


def test_second_register_and_missing_oneof(cluster: Cluster) -> None:
    client = source_peer(cluster, "h1", "p1", pieces=range(0))
    client.register(download())
    assert client.end() == grpc.StatusCode.FAILED_PRECONDITION
    other = source_peer(cluster, "h2", "p2", pieces=range(0))
    other.send()
    assert other.end() == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_piece_messages_are_logged_and_stream_continues(cluster: Cluster) -> None:
    client = source_peer(cluster, "h1", "p1", pieces=range(0))
    client.send(download_piece_back_to_source_finished_request=scheduler.DownloadPieceBackToSourceFinishedRequest(
        piece=common.Piece(number=9, offset=9 * PIECE, length=PIECE)))  # out of range
    bad_offset = piece_msg(1)
    bad_offset.offset = 5
    client.send(download_piece_back_to_source_finished_request=scheduler.DownloadPieceBackToSourceFinishedRequest(
        piece=bad_offset))
    client.send(download_piece_finished_request=scheduler.DownloadPieceFinishedRequest())
    client.send(download_piece_back_to_source_failed_request=scheduler.DownloadPieceBackToSourceFailedRequest(
        piece_number=2))
    client.source_piece(4)
    client.source_finished()
    assert client.end() == grpc.StatusCode.OK
    assert [p.number for p in cluster.stat_peer("p1").pieces] == [4]


def test_out_of_order_peer_message_fails_stream(cluster: Cluster) -> None:
    cluster.announce("h1")
    client = cluster.peer("h1", "p1", task_id="e" * 64)
    client.register(download(content=0))
    assert client.recv_kind() == "empty_task_response"
    client.source_finished()
    client.started()  # Succeeded -> Running is not allowed, but the stream already ended
    assert client.end() == grpc.StatusCode.OK
    other = source_peer(cluster, "h2", "p2", pieces=range(0))
    other.started()  # BackToSource -> Running is not allowed
    assert other.end() == grpc.StatusCode.FAILED_PRECONDITION
    assert healthy(cluster.target)


def test_broken_stream_fails_peer_and_drops_edges(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    cluster.announce("h1")
    child = cluster.peer("h1", "p1")
    child.register(download())
    assert child.recv_kind() == "normal_task_response"
    task = cluster.state.resources.tasks["t" * 64]
    assert task.parents_of("p1") == {"p0"}
    child.cancel()
    wait_for(lambda: task.peers["p1"].state is PeerState.FAILED)
    assert task.edges() == []
    assert cluster.state.resources.hosts["h0"].edge_tx_bandwidth == 0


def test_delete_task_and_peer(cluster: Cluster) -> None:
    source_peer(cluster, "h0", "p0")
    source_peer(cluster, "h1", "p1")
    cluster.stub.DeleteTask(scheduler.DeleteTaskRequest(host_id="h0", task_id="t" * 64), timeout=5)
    assert cluster.stat_task().peer_count == 1
    cluster.stub.DeletePeer(scheduler.DeletePeerRequest(task_id="t" * 64, peer_id="p1"), timeout=5)
    assert cluster.stat_task().peer_count == 0
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.DeletePeer(scheduler.DeletePeerRequest(task_id="t" * 64, peer_id="p1"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# Resource model


def make_task(n_peers: int, hosts: int = 4) -> tuple[Task, list[Peer], list[Host]]:
    task = Task("t" * 64, download(), 0.0)
    task.set_size(CONTENT, PIECE, 5)
    host_list = [Host(host_proto(f"h{i}"), 0.0) for i in range(hosts)]
    peers = []
    for i in range(n_peers):
        peer = Peer(f"p{i}", task, host_list[i % hosts], download(), 0.0)
        task.add_peer(peer)
        peers.append(peer)
    return task, peers, host_list


def acyclic(task: Task) -> bool:
    remaining = {p: set(task.parents_of(p)) for p in task.peers}
    while remaining:
        roots = [p for p, parents in remaining.items() if not parents]
        if not roots:
            return False
        for root in roots:
            del remaining[root]
        for parents in remaining.values():
            parents.difference_update(roots)
    return True


def test_dag_never_gets_a_cycle() -> None:
    rng = random.Random(7)
    task, peers, hosts = make_task(30)
    refused = 0
    for _ in range(3000):
        parent, child = rng.sample(peers, 2)
        if rng.random() < 0.2:
            task.remove_edge(parent.id, child.id)
            continue
        try:
            task.add_edge(parent, child)
        except CycleError:
            refused += 1
        assert acyclic(task)
    assert refused > 0 and task.edges()
    expected = len(task.edges())
    assert sum(h.concurrent_upload_piece_count for h in hosts) == expected * 8
    assert sum(h.edge_tx_bandwidth for h in hosts) == expected * PIECE * 8 * 8
    for peer in peers:
        task.remove_peer(peer.id)
    assert all(h.edge_tx_bandwidth == h.concurrent_upload_piece_count == h.upload_content_length == 0 for h in hosts)


def test_dag_refuses_self_duplicate_and_unknown_edges() -> None:
    task, (a, b, *_), _ = make_task(3)
    assert not task.can_add_edge("p0", "p0")
    task.add_edge(a, b)
    assert not task.can_add_edge("p0", "p1")
    assert not task.can_add_edge("p1", "p0")
    assert not task.can_add_edge("p0", "ghost")


def test_peer_state_machine() -> None:
    _, (peer, *_), _ = make_task(1)
    peer.transition(PeerState.RECEIVED_NORMAL, 1.0)
    peer.transition(PeerState.RUNNING, 2.0)
    peer.transition(PeerState.BACK_TO_SOURCE, 3.0)
    peer.transition(PeerState.SUCCEEDED, 4.0)
    with pytest.raises(ValueError):
        peer.transition(PeerState.RUNNING, 5.0)
    assert peer.updated_at == 4.0


def test_size_scopes() -> None:
    task = Task("t", download(), 0.0)
    assert task.size_scope() == 4
    for (content, pieces), scope in {(0, 0): common.SizeScope.EMPTY, (128, 1): common.SizeScope.TINY,
                                     (129, 1): common.SizeScope.SMALL, (CONTENT, 5): common.SizeScope.NORMAL}.items():
        task.set_size(content, PIECE, pieces)
        assert task.size_scope() == scope


def test_layout_defaults_and_checks() -> None:
    assert layout(common.Download(url=URL)) is None
    d = common.Download(url=URL, actual_content_length=1 << 30)
    assert layout(d) == (1 << 30, 4 * MiB, 256)
    d.piece_length = 8 * MiB
    assert layout(d) == (1 << 30, 8 * MiB, 128)
    assert layout(download()) == (CONTENT, PIECE, 5)


# Evaluator


def scored_peer(max_tx: int = 0, *, seed: bool = False, state: PeerState = PeerState.RUNNING, idc: str = "",
                location: str = "") -> Peer:
    task = Task("t", download(), 0.0)
    peer = Peer("p", task, Host(host_proto("h", seed=seed, max_tx=max_tx, idc=idc, location=location), 0.0),
                download(), 0.0)
    peer.state = state
    return peer


def test_load_scores() -> None:
    host = scored_peer(1_000_000_000).host  # 1 Gbit/s
    assert evaluator.peak_bandwidth(host) == 1.0
    assert evaluator.bandwidth_duration(host) == 1.0
    assert evaluator.concurrency(host) == 1.0  # needed = 7.45 pieces
    host.edge_tx_bandwidth = 250_000_000
    host.upload_content_length = 3_750_000_000  # 30 Gbit = half of 60 s at 1 Gbit/s
    host.concurrent_upload_piece_count = 15
    assert evaluator.peak_bandwidth(host) == pytest.approx(0.75)
    assert evaluator.bandwidth_duration(host) == pytest.approx(0.5)
    assert evaluator.concurrency(host) == pytest.approx(1_000_000_000 / (16 * MiB * 8) / 15)
    assert evaluator.load_quality(host) == pytest.approx(0.5 * 0.75 + 0.3 * 0.5 + 0.2 * 0.4967, abs=1e-3)
    host.edge_tx_bandwidth = 2_000_000_000
    assert evaluator.peak_bandwidth(host) == 0.0


def test_zero_capacity_zeroes_load() -> None:
    host = scored_peer(0).host
    assert evaluator.load_quality(host) == 0.0
    assert evaluator.concurrency(scored_peer(100_000_000).host) == 0.0  # needed < 1


def test_affinities() -> None:
    assert evaluator.idc_affinity("IDC-A", "idc-a") == 1.0
    assert evaluator.idc_affinity("", "") == 0.0
    assert evaluator.idc_affinity("a", "b") == 0.0
    assert evaluator.location_affinity("cn|sh|a|b|c|d", "cn|sh|a|b|c|e") == 1.0  # first 5 match
    assert evaluator.location_affinity("cn|sh|a", "cn|sh|b") == pytest.approx(0.4)
    assert evaluator.location_affinity("cn|sh", "cn|sh") == 1.0
    assert evaluator.location_affinity("us", "cn") == 0.0
    assert evaluator.location_affinity("", "cn") == 0.0


def test_host_type_and_total() -> None:
    assert evaluator.host_type_score(scored_peer(seed=True, state=PeerState.RUNNING)) == 1.0
    assert evaluator.host_type_score(scored_peer(seed=True, state=PeerState.RECEIVED_NORMAL)) == 1.0
    assert evaluator.host_type_score(scored_peer(seed=True, state=PeerState.BACK_TO_SOURCE)) == 0.0
    assert evaluator.host_type_score(scored_peer()) == 0.5
    parent = scored_peer(1_000_000_000, idc="x", location="a|b")
    child = scored_peer(idc="X", location="a|c")
    assert evaluator.evaluate(parent, child) == pytest.approx(0.6 * 1.0 + 0.2 * 1.0 + 0.1 * 0.2 + 0.1 * 0.5)


def record(cost: float) -> PieceRecord:
    return PieceRecord(0, 0, 1, "crc32:0", None, None, cost, 0.0)


def test_is_bad_parent() -> None:
    for state in (PeerState.PENDING, PeerState.RECEIVED_NORMAL, PeerState.RECEIVED_EMPTY, PeerState.FAILED,
                  PeerState.LEAVE):
        assert evaluator.is_bad_parent(scored_peer(state=state))
    for state in (PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED):
        assert not evaluator.is_bad_parent(scored_peer(state=state))
    peer = scored_peer()
    peer.record_piece(record(1.0), 0.0)
    assert not evaluator.is_bad_parent(peer)  # one cost is not enough
    peer.record_piece(record(20.0), 0.0)
    assert not evaluator.is_bad_parent(peer)  # exactly 20 times the mean
    peer.piece_costs.pop()
    peer.record_piece(record(20.5), 0.0)
    assert evaluator.is_bad_parent(peer)


def test_is_bad_parent_full_window() -> None:
    peer = scored_peer()
    for _ in range(18):
        peer.record_piece(record(1.0), 0.0)
    peer.record_piece(record(1.5), 0.0)
    assert not evaluator.is_bad_parent(peer)  # 19 costs: the window is filling, 20 x mean applies
    peer.piece_costs.pop()
    peer.record_piece(record(1.0), 0.0)
    peer.record_piece(record(1.0), 0.0)
    assert not evaluator.is_bad_parent(peer)  # full: mean + 3 sd = 1.0
    peer.record_piece(record(1.5), 0.0)
    assert evaluator.is_bad_parent(peer)


# GC and config


def test_gc_collects_by_ttl() -> None:
    config = SchedulerConfig(host_ttl=10, peer_ttl=100, piece_download_timeout=5)
    resources = Resources()
    old = resources.announce_host(host_proto("old"), 0.0)
    fresh = resources.announce_host(host_proto("fresh"), 20.0)
    task = resources.task("t", download(), 0.0)
    stuck, idle, done = (Peer(f"p{i}", task, fresh, download(), 14.0) for i in range(3))
    gone = Peer("gone", task, old, download(), 0.0)
    for peer in (stuck, idle, done, gone):
        resources.add_peer(peer)
    stuck.state, idle.state, done.state = PeerState.RUNNING, PeerState.RECEIVED_NORMAL, PeerState.SUCCEEDED
    result = collect(resources, config, now=20.0)
    assert (result.hosts, result.peers, result.tasks) == (1, 1, 0)
    assert sorted(task.peers) == ["p1", "p2"] and "old" not in resources.hosts
    collect(resources, config, now=120.0)
    assert not resources.tasks and not fresh.peers


def test_gc_thread(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(gc_interval=0.05, host_ttl=0.2)
    source_peer(cluster, "h1", "p1")
    wait_for(lambda: not cluster.state.resources.hosts, timeout=5)
    assert not cluster.state.resources.tasks


def test_collector_stops() -> None:
    collector = Collector(Resources(), SchedulerConfig(gc_interval=0.01))
    collector.start()
    collector.stop()


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.toml"
    path.write_text('[scheduler]\nlisten = "127.0.0.1:9000"\nretry_limit = 7\n')
    config = load_config(path, retry_limit=9, peer_ttl=None)
    assert (config.listen, config.retry_limit, config.candidate_parent_limit) == ("127.0.0.1:9000", 9, 2)
    with pytest.raises(ValueError, match="bogus"):
        load_config(None, bogus=1)


def test_state_exposed(cluster: Cluster) -> None:
    assert isinstance(cluster.state, SchedulerState)
    assert cluster.state.config.retry_interval == FAST["retry_interval"]


def test_run_serves_until_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "scheduler.toml"
    config.write_text(f'[scheduler]\nlisten = "127.0.0.1:{port}"\nlog_level = "info"\n')
    code = ("from pathlib import Path; from scheduler.server import load_config, run;"
            f" run(load_config(Path({str(config)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: healthy(f"127.0.0.1:{port}", timeout=0.5), timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert f"scheduler_started listen=127.0.0.1:{port} port={port}" in err
    assert "scheduler_stopping" in err
