"""Downloading a task's pieces from the parents the scheduler picked.

One ``SyncPieces`` stream per parent tells which pieces it holds (and each one it finishes later); workers,
``concurrent_piece_count`` of them, take the rarest missing piece and fetch it over Vortex from a holder
chosen at random, weighted by the holder's idle upload bandwidth and by how many pieces this peer is
already pulling from it. Every piece is checked against its digest before it is stored.
"""

from __future__ import annotations

import logging
import mmap
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import trio

from p2p import grpc_bridge
from p2p import reporter as report
from p2p.api import HOST_TYPE_SEED, common, dfdaemon, upload_stub
from p2p.direct_io import aligned_buffer
from p2p.piece_client import PieceError, download_piece
from p2p.pieces import Piece
from p2p.ratelimit import RateLimiter
from p2p.storage import Storage

log = logging.getLogger("lazyfs.peer")
STALL_SECONDS = 60.0  # no piece arrived and none in flight for this long: ask the scheduler again
DEFER_SECONDS = 2.0  # a piece a parent refused or held back is asked of it again after this
SEED_SHARE = 1  # pieces pulled from one seed at once while other peers are parents too
WIDEN_SECONDS = 1.0  # with only seeds as parents, ask the scheduler for peers (that have since joined) after this


@dataclass
class Parents:
    """What the collector learnt about its parents."""

    peers: dict[str, common.Peer]
    holders: defaultdict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    address: dict[str, tuple[str, int]] = field(default_factory=dict)
    inflight: Counter[str] = field(default_factory=Counter)
    blocked: set[str] = field(default_factory=set)
    bytes_from: Counter[str] = field(default_factory=Counter)

    def is_seed(self, parent_id: str) -> bool:
        """Whether the parent is a seed peer."""
        return bool(self.peers[parent_id].host.type == HOST_TYPE_SEED)

    def weight(self, parent_id: str) -> float:
        """Idle upload bandwidth (at least 10% of the maximum), shared by the pieces already pulled from it;
        a seed counts a quarter, so peers that hold a piece serve it first."""
        network = self.peers[parent_id].host.network
        idle = max(network.max_tx_bandwidth - network.tx_bandwidth, network.max_tx_bandwidth // 10, 1)
        share = idle / (1 + self.inflight[parent_id])
        return share / 4 if self.is_seed(parent_id) else share


class PieceCollector:
    """Fetches the missing pieces of one task from one set of candidate parents."""

    def __init__(self, storage: Storage, task_id: str, host_id: str, wanted: list[Piece], parents: list[common.Peer],
                 reporter: report.Reporter, channels: grpc_bridge.ChannelPool, *, concurrency: int, timeout: float,
                 limiter: RateLimiter, widen: bool = False) -> None:
        self.storage = storage
        self.task_id = task_id
        self.host_id = host_id
        self.pieces = {p.number: p for p in wanted}
        self.missing = set(self.pieces)
        self.parents = Parents({p.id: p for p in parents})
        self.reporter = reporter
        self.channels = channels
        self.concurrency = concurrency
        self.threads = trio.CapacityLimiter(concurrency)  # one receiving thread per worker, apart from trio's pool
        self.timeout = timeout
        self.limiter = limiter
        self.failed_on: defaultdict[int, set[str]] = defaultdict(set)
        self.busy: set[int] = set()
        self.live_streams = 0
        self.peer_parents = any(not self.parents.is_seed(p) for p in self.parents.peers)
        self.widen = widen and not self.peer_parents  # stop early to ask for more parents
        self.winding_down = False
        self.deferred: dict[str, dict[int, float]] = {}  # parent -> piece -> not before (refused, held back)
        self.workers = 0
        self.last_progress = trio.current_time()
        self._changed = trio.Event()
        self._scope = trio.CancelScope()

    async def run(self) -> bool:
        """Collect until every wanted piece is stored (True) or these parents can give no more (False)."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                for parent in self.parents.peers.values():
                    self.live_streams += 1
                    nursery.start_soon(self._sync, parent)
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker)
                nursery.start_soon(self._watchdog)
        return not self.missing

    @property
    def bad_parents(self) -> list[common.Peer]:
        """Parents that failed a piece, for ReschedulePeer (they join the scheduler's block list)."""
        return [self.parents.peers[p] for p in sorted(self.parents.blocked)]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _sync(self, parent: common.Peer) -> None:
        target = f"{parent.host.ip}:{parent.host.port}"
        stub = upload_stub(self.channels.get(target))
        request = dfdaemon.SyncPiecesRequest(host_id=self.host_id, task_id=self.task_id,
                                             interested_piece_numbers=sorted(self.missing))
        stream = grpc_bridge.server_stream(stub.SyncPieces, request)
        try:
            async for answer in stream:
                if answer.number not in self.pieces:
                    continue
                port = answer.tcp_port if answer.HasField("tcp_port") else parent.host.port
                self.parents.address[parent.id] = (answer.ip or parent.host.ip, port)
                self.parents.holders[answer.number].add(parent.id)
                self._notify()
        except grpc.RpcError as exc:
            log.info("sync-pieces ended task=%s parent=%s code=%s", self.task_id, parent.id, exc.code())
        finally:
            stream.cancel()
            self.live_streams -= 1
            self._notify()

    def _pick(self) -> tuple[int, str] | None:
        """A missing piece and a parent for it: pieces other peers can give first (sparing the seed, the swarm's
        only link to the origin), rarest first among them; the parent at random, weighted."""
        best: tuple[tuple[bool, int], int, list[str]] | None = None
        now = trio.current_time()
        spare = {p for p in self.parents.peers if self.parents.is_seed(p) and self.parents.inflight[p] >= SEED_SHARE
                 and self.peer_parents}
        for number in self.missing - self.busy:
            holders = [p for p in self.parents.holders.get(number, ())
                       if p not in self.parents.blocked and p not in self.failed_on[number] and p not in spare
                       and self.deferred.get(p, {}).get(number, 0.0) <= now]
            if not holders:
                continue
            rank = (all(self.parents.is_seed(p) for p in holders), len(holders))
            if best is None or rank < best[0] or (rank == best[0] and random.random() < 0.5):
                best = (rank, number, holders)
        if best is None:
            return None
        _, number, holders = best
        return number, random.choices(holders, [self.parents.weight(p) for p in holders])[0]

    def _deferred_pending(self) -> bool:
        """Whether a missing piece waits only for a deferral to pass (the watchdog retries it every second)."""
        return any(number in self.missing and parent not in self.parents.blocked
                   for parent, numbers in self.deferred.items() for number in numbers)

    async def _watchdog(self) -> None:
        started = trio.current_time()
        while True:
            await trio.sleep(WIDEN_SECONDS if self.widen else 1)
            if self.widen and trio.current_time() - started >= WIDEN_SECONDS and not self.winding_down:
                log.info("only seeds as parents task=%s missing=%d: asking the scheduler for peers", self.task_id,
                         len(self.missing))
                self.winding_down = True  # workers finish the pieces in flight, then the scheduler is asked again
                self._notify()
            self._notify()  # deferred pieces may be due
            if not self.busy and trio.current_time() - self.last_progress > STALL_SECONDS:
                log.warning("no progress task=%s missing=%d: asking the scheduler again", self.task_id,
                            len(self.missing))
                self._scope.cancel()

    async def _worker(self) -> None:
        buffer = aligned_buffer(0)  # one per worker, reused piece after piece
        self.workers += 1
        while self.missing and not self.winding_down:
            choice = self._pick()
            if choice is None:
                if self.live_streams == 0 and not self.busy and not self._deferred_pending():
                    break
                await self._changed.wait()
                continue
            buffer = await self._fetch(*choice, buffer)
        self.workers -= 1
        if not self.winding_down or self.workers == 0:
            self._scope.cancel()

    async def _fetch(self, number: int, parent_id: str, buffer: mmap.mmap) -> mmap.mmap:
        piece = self.pieces[number]
        host, port = self.parents.address[parent_id]
        self.busy.add(number)
        self.parents.inflight[parent_id] += 1
        start = time.monotonic_ns()
        if len(buffer) < piece.length:
            buffer = aligned_buffer(piece.length)
        try:
            metadata, data = await download_piece(host, port, self.task_id, number, expected_length=piece.length,
                                                  timeout=self.timeout, limiter=self.limiter, buffer=buffer,
                                                  threads=self.threads)
        except PieceError as exc:
            self._failed(number, parent_id, exc)
        else:
            info = await self.storage.write_piece_async(self.task_id, number, data, parent_id=parent_id,
                                                        traffic_type=common.REMOTE_PEER,
                                                        cost_ns=time.monotonic_ns() - start, digest=metadata.digest)
            self.missing.discard(number)
            self.parents.bytes_from[parent_id] += len(data)
            self.last_progress = trio.current_time()
            report.piece_finished(self.reporter, info)
        finally:
            self.busy.discard(number)
            self.parents.inflight[parent_id] -= 1
            self._notify()
        return buffer

    def _failed(self, number: int, parent_id: str, exc: PieceError) -> None:
        if exc.kind in ("refused", "not_found"):
            # at its upload cap, or a super-seed that just gave the piece to another peer: elsewhere, or later
            self.deferred.setdefault(parent_id, {})[number] = trio.current_time() + DEFER_SECONDS
            log.info("piece deferred task=%s piece=%d parent=%s kind=%s", self.task_id, number, parent_id, exc.kind)
            return
        log.warning("piece failed task=%s piece=%d parent=%s kind=%s error=%s", self.task_id, number, parent_id,
                    exc.kind, exc)
        self.failed_on[number].add(parent_id)
        if exc.kind in ("corrupt", "network"):
            self.parents.blocked.add(parent_id)
        report.piece_failed(self.reporter, number, parent_id)
