"""The scheduler's resource model: hosts, tasks, peers, the per-task DAG of peer edges and the load edges put
on parent hosts (Dragonfly ``scheduler/resource/standard``). Callers hold :attr:`Resources.lock`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from p2p.api import HOST_TYPE_NORMAL, common

PIECE_COST_WINDOW = 20
DEFAULT_CONCURRENT_PIECE_COUNT = 8
TINY_LIMIT = 128
UNKNOWN_SIZE_SCOPE = 4  # Go's SizeScope.UNKNOW, absent from the Python enum


class PeerState(StrEnum):
    """Dragonfly's peer FSM states (the strings Dragonfly reports)."""

    PENDING = "Pending"
    RECEIVED_EMPTY = "ReceivedEmpty"
    RECEIVED_TINY = "ReceivedTiny"
    RECEIVED_SMALL = "ReceivedSmall"
    RECEIVED_NORMAL = "ReceivedNormal"
    RUNNING = "Running"
    BACK_TO_SOURCE = "BackToSource"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


class TaskState(StrEnum):
    """Dragonfly's task FSM states."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


RECEIVED = frozenset({PeerState.RECEIVED_EMPTY, PeerState.RECEIVED_TINY, PeerState.RECEIVED_SMALL,
                      PeerState.RECEIVED_NORMAL})
_AFTER_RECEIVED = frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED, PeerState.FAILED,
                             PeerState.LEAVE})
_FETCHING = RECEIVED | {PeerState.PENDING, PeerState.RUNNING, PeerState.BACK_TO_SOURCE}
_MOVES: dict[PeerState, frozenset[PeerState]] = {
    PeerState.PENDING: RECEIVED | {PeerState.FAILED, PeerState.LEAVE},
    **dict.fromkeys(RECEIVED, _AFTER_RECEIVED),
    PeerState.RUNNING: frozenset({PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE}),
    PeerState.BACK_TO_SOURCE: frozenset({PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE}),
    PeerState.SUCCEEDED: frozenset({PeerState.FAILED, PeerState.LEAVE}),
    PeerState.FAILED: frozenset({PeerState.LEAVE}),
    PeerState.LEAVE: frozenset(),
}


class TransitionError(ValueError):
    """A peer state change the FSM does not allow."""


class CycleError(ValueError):
    """An edge that would close a cycle in a task's DAG (or join unknown peers)."""


@dataclass(frozen=True, slots=True)
class PieceRecord:
    """A finished piece as a peer reported it; *cost* in seconds, *created_at* a Unix time."""

    number: int
    offset: int
    length: int
    digest: str
    parent_id: str | None
    traffic_type: int | None
    cost: float
    created_at: float


@dataclass(frozen=True, slots=True)
class EdgeLoad:
    """What one parent→child edge added to the parent host, taken off again when the edge goes."""

    tx_bandwidth: int
    upload_pieces: int
    content_length: int


class Host:
    """An announced host, with the upload load of the edges it parents."""

    def __init__(self, proto: common.Host, now: float) -> None:
        self.id = proto.id
        self.peers: dict[str, Peer] = {}
        self.edge_tx_bandwidth = 0
        self.concurrent_upload_piece_count = 0
        self.upload_content_length = 0
        self.upload_count = 0
        self.upload_failed_count = 0
        self.created_at = now
        self.update(proto, now)

    def update(self, proto: common.Host, now: float) -> None:
        """Take a fresh announce."""
        self.proto = common.Host()
        self.proto.CopyFrom(proto)
        self.announced_at = now

    @property
    def is_seed(self) -> bool:
        """Whether this is a seed (super) peer host."""
        return self.proto.type != HOST_TYPE_NORMAL

    @property
    def idc(self) -> str:
        """The announced IDC, or ``""``."""
        return self.proto.network.idc

    @property
    def location(self) -> str:
        """The announced ``a|b|c`` location, or ``""``."""
        return self.proto.network.location

    @property
    def max_tx_bandwidth(self) -> int:
        """Announced upload capacity, bits/s."""
        return self.proto.network.max_tx_bandwidth

    @property
    def tx_bandwidth(self) -> int:
        """Announced upload rate plus the load of current edges, bits/s."""
        return self.proto.network.tx_bandwidth + self.edge_tx_bandwidth

    def add_load(self, load: EdgeLoad, sign: int) -> None:
        """Add (sign 1) or remove (sign -1) an edge's load."""
        self.edge_tx_bandwidth += sign * load.tx_bandwidth
        self.concurrent_upload_piece_count += sign * load.upload_pieces
        self.upload_content_length += sign * load.content_length


class Peer:
    """One download of a task by a host."""

    def __init__(self, peer_id: str, task: Task, host: Host, download: common.Download, now: float) -> None:
        self.id = peer_id
        self.task = task
        self.host = host
        self.priority = int(download.priority)
        self.range: tuple[int, int] | None = (
            (download.range.start, download.range.length) if download.HasField("range") else None)
        self.need_back_to_source = download.need_back_to_source
        self.metadata_only = download.metadata_only
        self.concurrent_piece_count = (download.concurrent_piece_count if download.HasField("concurrent_piece_count")
                                       else DEFAULT_CONCURRENT_PIECE_COUNT)
        self.state = PeerState.PENDING
        self.pieces: dict[int, PieceRecord] = {}
        self.piece_costs: deque[float] = deque(maxlen=PIECE_COST_WINDOW)
        self.block_parents: set[str] = {peer_id}
        self.created_at = self.updated_at = self.piece_updated_at = now

    def transition(self, state: PeerState, now: float) -> None:
        """Move to *state*; TransitionError if the FSM forbids it."""
        if state not in _MOVES[self.state]:
            raise TransitionError(f"peer {self.id} cannot go from {self.state} to {state}")
        self.state = state
        self.updated_at = now

    def record_piece(self, piece: PieceRecord, now: float) -> None:
        """Store a finished piece and its cost."""
        self.pieces[piece.number] = piece
        self.piece_costs.append(piece.cost)
        self.updated_at = self.piece_updated_at = now

    def wanted_pieces(self) -> frozenset[int] | None:
        """The piece numbers this peer's download wants: its range's, or None for every piece."""
        if self.range is None or self.range[1] <= 0 or self.task.piece_length <= 0:
            return None
        start, length = self.range
        return frozenset(range(start // self.task.piece_length, (start + length - 1) // self.task.piece_length + 1))

    def may_supply(self, wanted: frozenset[int] | None) -> bool:
        """Whether this peer's host holds, or this peer is downloading, every piece in *wanted* (None: the whole
        task). Pieces live on hosts: what the host's other peers of the task stored (earlier ranged downloads of a
        seed, say) is served through this one too."""
        if self.finished_all_pieces:
            return True
        held = self.host_pieces()
        if wanted is not None and wanted <= held:
            return True
        if self.state not in _FETCHING:
            return False
        mine = self.wanted_pieces()
        return mine is None or (wanted is not None and wanted <= held | mine)

    def host_pieces(self) -> set[int]:
        """The piece numbers this peer and the other peers of its task on its host hold."""
        held = set(self.pieces)
        for other in self.task.peers.values():
            if other.host is self.host and other is not self:
                held.update(other.pieces)
        return held

    @property
    def finished_all_pieces(self) -> bool:
        """Whether the peer holds every piece of a task of known size (or said it does: metadata only)."""
        if self.metadata_only:
            return True
        count = self.task.piece_count
        return self.task.content_length >= 0 and len(self.pieces) >= count


class Task:
    """A task with its peers and the DAG of parent→child edges between them."""

    def __init__(self, task_id: str, download: common.Download, now: float) -> None:
        self.id = task_id
        self.download = common.Download()
        self.download.CopyFrom(download)
        self.state = TaskState.PENDING
        self.content_length = -1
        self.piece_length = 0
        self.piece_count = 0
        self.peers: dict[str, Peer] = {}
        self.pieces: dict[int, PieceRecord] = {}
        self.back_to_source_peers: set[str] = set()
        self.seed_in_flight = False
        self.seed_failed_at: float | None = None
        self.created_at = self.updated_at = now
        self._parents: dict[str, set[str]] = {}
        self._children: dict[str, set[str]] = {}
        self._edges: dict[tuple[str, str], EdgeLoad] = {}

    def set_size(self, content_length: int, piece_length: int, piece_count: int) -> None:
        """Record the task's layout from a register."""
        self.content_length, self.piece_length, self.piece_count = content_length, piece_length, piece_count

    def reset_size(self) -> None:
        """Forget the layout (after a failed back-to-source), as Dragonfly does."""
        self.set_size(-1, 0, 0)

    def size_scope(self) -> int:
        """Dragonfly's SizeScope: EMPTY, TINY (≤ 128 B), SMALL (one piece), NORMAL, or UNKNOWN (4)."""
        if self.content_length < 0:
            return UNKNOWN_SIZE_SCOPE
        if self.content_length == 0:
            return int(common.SizeScope.EMPTY)
        if self.content_length <= TINY_LIMIT:
            return int(common.SizeScope.TINY)
        return int(common.SizeScope.SMALL if self.piece_count == 1 else common.SizeScope.NORMAL)

    def add_peer(self, peer: Peer) -> None:
        """Add *peer* as a DAG vertex."""
        self.peers[peer.id] = peer
        self._parents[peer.id] = set()
        self._children[peer.id] = set()

    def remove_peer(self, peer_id: str) -> None:
        """Drop a peer and every edge touching it."""
        self.remove_edges(peer_id)
        self.peers.pop(peer_id, None)
        self._parents.pop(peer_id, None)
        self._children.pop(peer_id, None)
        self.back_to_source_peers.discard(peer_id)

    def parents_of(self, peer_id: str) -> frozenset[str]:
        """Ids of the peer's parents."""
        return frozenset(self._parents.get(peer_id, ()))

    def children_of(self, peer_id: str) -> frozenset[str]:
        """Ids of the peer's children."""
        return frozenset(self._children.get(peer_id, ()))

    def in_degree(self, peer_id: str) -> int:
        """How many parents the peer has."""
        return len(self._parents.get(peer_id, ()))

    def can_add_edge(self, parent_id: str, child_id: str) -> bool:
        """Whether parent→child joins two known peers, is new, and closes no cycle."""
        if parent_id == child_id or parent_id not in self.peers or child_id not in self.peers:
            return False
        if parent_id in self._parents[child_id]:
            return False
        return not self._reaches(child_id, parent_id)

    def _reaches(self, start: str, goal: str) -> bool:
        stack, seen = [start], {start}
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            for child in self._children[node] - seen:
                seen.add(child)
                stack.append(child)
        return False

    def add_edge(self, parent: Peer, child: Peer) -> None:
        """Add parent→child and its load on the parent host; CycleError if :meth:`can_add_edge` refuses."""
        if not self.can_add_edge(parent.id, child.id):
            raise CycleError(f"edge {parent.id} -> {child.id} refused")
        load = EdgeLoad(self.piece_length * child.concurrent_piece_count * 8, child.concurrent_piece_count,
                        max(self.content_length, 0))
        self._edges[(parent.id, child.id)] = load
        self._parents[child.id].add(parent.id)
        self._children[parent.id].add(child.id)
        parent.host.add_load(load, 1)

    def remove_edge(self, parent_id: str, child_id: str) -> None:
        """Drop parent→child and take its load off the parent host."""
        load = self._edges.pop((parent_id, child_id), None)
        if load is None:
            return
        self._parents[child_id].discard(parent_id)
        self._children[parent_id].discard(child_id)
        self.peers[parent_id].host.add_load(load, -1)

    def remove_in_edges(self, peer_id: str) -> None:
        """Drop every edge into *peer_id*."""
        for parent_id in self.parents_of(peer_id):
            self.remove_edge(parent_id, peer_id)

    def remove_edges(self, peer_id: str) -> None:
        """Drop every edge into and out of *peer_id*."""
        self.remove_in_edges(peer_id)
        for child_id in self.children_of(peer_id):
            self.remove_edge(peer_id, child_id)

    def edges(self) -> list[tuple[str, str]]:
        """Every parent→child edge."""
        return list(self._edges)

    def has_available_peer(self, exclude: str, wanted: frozenset[int] | None = None) -> bool:
        """Whether some other peer holds or is about to hold the wanted pieces (so no seed trigger is needed)."""
        return any(p.may_supply(wanted) for p in self.peers.values() if p.id != exclude)

    def can_back_to_source(self, peer_id: str, limit: int) -> bool:
        """Whether *peer_id* may go back to source: at most *limit* peers of the task do."""
        return peer_id in self.back_to_source_peers or len(self.back_to_source_peers) < limit

    def seed_failed(self, now: float, timeout: float) -> bool:
        """Whether a seed trigger for this task failed within the last *timeout* seconds."""
        return self.seed_failed_at is not None and now - self.seed_failed_at < timeout


@dataclass
class Resources:
    """Every host and task, behind one lock that all readers and writers hold."""

    hosts: dict[str, Host] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def announce_host(self, proto: common.Host, now: float) -> Host:
        """Create or refresh a host."""
        host = self.hosts.get(proto.id)
        if host is None:
            host = self.hosts[proto.id] = Host(proto, now)
        else:
            host.update(proto, now)
        return host

    def task(self, task_id: str, download: common.Download, now: float) -> Task:
        """The task *task_id*, created from *download* if new."""
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = Task(task_id, download, now)
        return task

    def add_peer(self, peer: Peer) -> None:
        """Link a new peer to its task and host."""
        peer.task.add_peer(peer)
        peer.host.peers[peer.id] = peer

    def delete_peer(self, peer: Peer) -> None:
        """Remove a peer, its edges and its links."""
        peer.state = PeerState.LEAVE
        peer.task.remove_peer(peer.id)
        peer.host.peers.pop(peer.id, None)

    def delete_task(self, task: Task) -> None:
        """Remove a task and its peers."""
        for peer in list(task.peers.values()):
            self.delete_peer(peer)
        task.state = TaskState.LEAVE
        self.tasks.pop(task.id, None)

    def delete_host(self, host: Host) -> None:
        """Remove a host and its peers."""
        for peer in list(host.peers.values()):
            self.delete_peer(peer)
        self.hosts.pop(host.id, None)

    def find_peer(self, task_id: str, peer_id: str) -> Peer | None:
        """A peer by task and id."""
        task = self.tasks.get(task_id)
        return None if task is None else task.peers.get(peer_id)

    def seeds(self) -> list[Host]:
        """Announced seed hosts."""
        return [h for h in self.hosts.values() if h.is_seed]
