"""One ``AnnouncePeer`` stream: a peer's download from Register to a terminal message (protocol doc §2.4).

Register must come first. Finished, BackToSourceFinished, Failed and BackToSourceFailed end the stream; piece
messages only update state, and their errors are logged while the stream goes on. A stream that breaks before
a terminal message leaves its peer Failed, without edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc

from p2p.api import common, scheduler
from p2p.pieces import piece_length as default_piece_length
from scheduler import logfmt
from scheduler.convert import piece_record
from scheduler.errors import ServiceError
from scheduler.resources import Peer, PeerState, PieceRecord, Task, TaskState, TransitionError

if TYPE_CHECKING:
    from scheduler.service import SchedulerService

log = logging.getLogger(__name__)
Request = scheduler.AnnouncePeerRequest
Response = scheduler.AnnouncePeerResponse
_PIECE_KINDS = frozenset({"download_piece_finished_request", "download_piece_back_to_source_finished_request",
                          "download_piece_failed_request", "download_piece_back_to_source_failed_request"})
_GONE = frozenset({PeerState.FAILED, PeerState.LEAVE})
Layout = tuple[int, int, int]  # content length, piece length, piece count


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)


def _check_register(request: Request) -> common.Download:
    if not (request.host_id and request.task_id and request.peer_id):
        raise _invalid("host_id, task_id and peer_id are required")
    download = request.register_peer_request.download
    if not request.register_peer_request.HasField("download") or not download.url:
        raise _invalid("register_peer_request.download.url is required")
    if download.type != common.TaskType.STANDARD:
        raise _invalid(f"only STANDARD tasks are scheduled here, not {common.TaskType.Name(download.type)}")
    if download.HasField("concurrent_piece_count") and download.concurrent_piece_count == 0:
        raise _invalid("concurrent_piece_count must be positive")
    if download.metadata_only and not download.HasField("actual_content_length"):
        raise _invalid("metadata_only register needs actual_content_length")
    return download


def layout(download: common.Download) -> Layout | None:
    """The task layout a register states, checked for consistency; None when the content length is not given."""
    if not download.HasField("actual_content_length"):
        return None
    content = download.actual_content_length
    if download.HasField("actual_piece_length"):
        length = download.actual_piece_length
    elif download.HasField("piece_length"):
        length = download.piece_length
    else:
        length = default_piece_length(content)
    if length <= 0:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"piece length {length} must be positive")
    count = -(-content // length)
    if download.HasField("actual_piece_count") and download.actual_piece_count != count:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"actual_piece_count {download.actual_piece_count} does not match {count} pieces"
                           f" of {length} bytes in {content} bytes")
    return content, length, count


def _check_piece(task: Task, piece: PieceRecord) -> None:
    if task.content_length < 0:
        return
    if not 0 <= piece.number < task.piece_count:
        raise _invalid(f"piece {piece.number} out of range: task {task.id} has {task.piece_count} pieces")
    offset = piece.number * task.piece_length
    length = min(task.piece_length, task.content_length - offset)
    if (piece.offset, piece.length) != (offset, length):
        raise _invalid(f"piece {piece.number} at {piece.offset}+{piece.length}, expected {offset}+{length}")


class PeerStream:
    """State of one AnnouncePeer call, driven by :meth:`run`."""

    def __init__(self, service: SchedulerService, alive: Callable[[], bool]) -> None:
        self._service = service
        self._resources = service.resources
        self._alive = alive
        self.peer: Peer | None = None
        self.peer_id = ""
        self._ids: tuple[str, str, str] = ("", "", "")
        self._done = False
        self._handlers: dict[str, Callable[[Request], Response | None]] = {
            "download_peer_started_request": self._started,
            "download_peer_back_to_source_started_request": self._back_to_source_started,
            "reschedule_peer_request": self._reschedule,
            "download_peer_finished_request": self._finished,
            "download_peer_back_to_source_finished_request": self._back_to_source_finished,
            "download_peer_failed_request": self._failed,
            "download_peer_back_to_source_failed_request": self._back_to_source_failed,
            "download_piece_finished_request": self._piece_finished,
            "download_piece_back_to_source_finished_request": self._piece_finished,
            "download_piece_failed_request": self._piece_failed,
            "download_piece_back_to_source_failed_request": self._back_to_source_piece_failed,
        }

    def run(self, requests: Iterator[Request]) -> Iterator[Response]:
        """Responses to *requests*; raises ServiceError to end the call with a status."""
        first = next(requests, None)
        if first is None:
            return
        self.peer_id = first.peer_id
        kind = first.WhichOneof("request")
        if kind != "register_peer_request":
            raise _precondition(f"first message must be register_peer_request, not {kind or 'an empty request'}")
        yield self._register(first)
        for request in requests:
            response = self._handle(request)
            if response is not None:
                yield response
            if self._done:
                return

    def close(self) -> None:
        """After the call: a peer that did not end properly becomes Failed and loses its edges."""
        peer = self.peer
        if peer is None or self._done:
            return
        with self._resources.lock:
            if peer.state in _GONE:
                return
            peer.state = PeerState.FAILED
            peer.task.remove_edges(peer.id)
            peer.task.back_to_source_peers.discard(peer.id)
        logfmt.log(log, logging.INFO, "peer_stream_broken", task=peer.task.id, peer=peer.id)

    def _handle(self, request: Request) -> Response | None:
        ids = (request.host_id, request.task_id, request.peer_id)
        for name, got, want in zip(("host_id", "task_id", "peer_id"), ids, self._ids, strict=True):
            if got != want:
                raise _invalid(f"{name} {got!r} does not match the registered {want!r}")
        kind = request.WhichOneof("request")
        if kind is None:
            raise _precondition("request has no message set")
        if kind == "register_peer_request":
            raise _precondition(f"peer {self.peer_id} is already registered on this stream")
        if kind not in _PIECE_KINDS:
            return self._handlers[kind](request)
        try:
            self._handlers[kind](request)
        except ServiceError as exc:
            logfmt.log(log, logging.WARNING, "piece_message_rejected", peer=self.peer_id, kind=kind,
                       error=exc.message)
        return None

    # Register

    def _register(self, request: Request) -> Response:
        download = _check_register(request)
        size = layout(download)
        self._ids = (request.host_id, request.task_id, request.peer_id)
        with self._resources.lock:
            response = self._admit(download, size)
        if response is not None:
            return response
        assert self.peer is not None
        return self._service.scheduling.schedule(self.peer, self._alive)

    def _admit(self, download: common.Download, size: Layout | None) -> Response | None:
        host_id, task_id, peer_id = self._ids
        now = self._service.clock()
        host = self._service.host(host_id)
        task = self._resources.task(task_id, download, now)
        if peer_id in task.peers:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"peer {peer_id} is already registered")
        if size is not None:
            self._apply_layout(task, size)
        peer = Peer(peer_id, task, host, download, now)
        self._resources.add_peer(peer)
        self.peer = peer
        task.state, task.updated_at = TaskState.RUNNING, now
        logfmt.log(log, logging.INFO, "register", task=task_id, peer=peer_id, host=host_id,
                   content_length=task.content_length, priority=peer.priority)
        if download.metadata_only:
            peer.transition(PeerState.RECEIVED_NORMAL, now)
            return Response(metadata_only_response=scheduler.MetadataOnlyResponse())
        if task.size_scope() == common.SizeScope.EMPTY:
            peer.transition(PeerState.RECEIVED_EMPTY, now)
            return Response(empty_task_response=scheduler.EmptyTaskResponse())
        try:
            peer.need_back_to_source |= self._service.route_new_task(task, host, peer_id, download)
        except ServiceError:
            self._resources.delete_peer(peer)
            self.peer = None
            raise
        peer.transition(PeerState.RECEIVED_NORMAL, now)
        return None

    @staticmethod
    def _apply_layout(task: Task, size: Layout) -> None:
        if task.content_length < 0:
            task.set_size(*size)
        elif (task.content_length, task.piece_length, task.piece_count) != size:
            raise _precondition(f"register states content/piece length/count {size}, task {task.id} has"
                                f" {(task.content_length, task.piece_length, task.piece_count)}")

    # Peer messages

    def _live(self) -> Peer:
        peer = self.peer
        if peer is None or peer.state is PeerState.LEAVE:
            raise _precondition(f"peer {self.peer_id} has left")
        return peer

    def _move(self, state: PeerState) -> Peer:
        peer = self._live()
        try:
            peer.transition(state, self._service.clock())
        except TransitionError as exc:
            raise _precondition(str(exc)) from exc
        peer.task.updated_at = peer.updated_at
        return peer

    def _started(self, request: Request) -> None:
        with self._resources.lock:
            if self._live().state is not PeerState.RUNNING:
                self._move(PeerState.RUNNING)

    def _back_to_source_started(self, request: Request) -> None:
        with self._resources.lock:
            if self._live().state is not PeerState.BACK_TO_SOURCE:
                peer = self._move(PeerState.BACK_TO_SOURCE)
                peer.task.back_to_source_peers.add(peer.id)

    def _reschedule(self, request: Request) -> Response:
        with self._resources.lock:
            peer = self._live()
            peer.block_parents.update(p.id for p in request.reschedule_peer_request.candidate_parents)
            peer.updated_at = self._service.clock()
        logfmt.log(log, logging.INFO, "reschedule", task=peer.task.id, peer=peer.id,
                   reason=request.reschedule_peer_request.description)
        return self._service.scheduling.schedule(peer, self._alive)

    def _finish(self, state: PeerState, from_source: bool) -> Peer:
        """Move to *state*, drop the edges that are no longer needed, end the stream (lock held)."""
        peer = self._move(state)
        if state is PeerState.FAILED:
            peer.task.remove_edges(peer.id)
        else:
            peer.task.remove_in_edges(peer.id)
        if state is PeerState.SUCCEEDED and peer.range is None and (from_source or peer.finished_all_pieces):
            peer.task.state = TaskState.SUCCEEDED
        self._done = True
        logfmt.log(log, logging.INFO, "peer_done", task=peer.task.id, peer=peer.id, state=peer.state,
                   task_state=peer.task.state)
        return peer

    def _finished(self, request: Request) -> None:
        with self._resources.lock:
            self._finish(PeerState.SUCCEEDED, from_source=False)

    def _back_to_source_finished(self, request: Request) -> None:
        with self._resources.lock:
            self._finish(PeerState.SUCCEEDED, from_source=True)

    def _failed(self, request: Request) -> None:
        with self._resources.lock:
            self._finish(PeerState.FAILED, from_source=False)

    def _back_to_source_failed(self, request: Request) -> None:
        with self._resources.lock:
            peer = self._finish(PeerState.FAILED, from_source=True)
            peer.task.back_to_source_peers.discard(peer.id)
            peer.task.reset_size()
            peer.task.state = TaskState.FAILED

    # Piece messages (errors are logged by _handle)

    def _piece_finished(self, request: Request) -> None:
        kind = request.WhichOneof("request")
        message = getattr(request, kind or "")
        if not message.HasField("piece"):
            raise _invalid("piece is required")
        with self._resources.lock:
            peer = self._live()
            now = self._service.clock()
            record = piece_record(message.piece, now)
            _check_piece(peer.task, record)
            peer.record_piece(record, now)
            peer.task.pieces.setdefault(record.number, record)
            parent = peer.task.peers.get(record.parent_id or "")
            if parent is not None:
                parent.updated_at = now
                parent.host.upload_count += 1

    def _piece_failed(self, request: Request) -> None:
        message = request.download_piece_failed_request
        if not message.temporary:
            raise _invalid(f"piece {message.piece_number} failed from {message.parent_id}, not temporary")
        with self._resources.lock:
            peer = self._live()
            peer.block_parents.add(message.parent_id)
            parent = peer.task.peers.get(message.parent_id)
            if parent is not None:
                parent.host.upload_failed_count += 1

    def _back_to_source_piece_failed(self, request: Request) -> None:
        message = request.download_piece_back_to_source_failed_request
        with self._resources.lock:
            self._live().updated_at = self._service.clock()
        logfmt.log(log, logging.WARNING, "back_to_source_piece_failed", peer=self.peer_id,
                   piece=message.piece_number)
