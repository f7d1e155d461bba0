"""A peer's side of ``scheduler.v2.Scheduler/AnnouncePeer``: the messages it sends while it downloads."""

from __future__ import annotations

import time
from typing import Any, Protocol

from google.protobuf import duration_pb2, timestamp_pb2

from p2p.api import common, scheduler
from p2p.grpc_bridge import BidiStream
from p2p.storage import PieceInfo


class Reporter(Protocol):
    """Where a download reports its progress: the scheduler stream, or nowhere."""

    def send(self, **oneof: Any) -> None:
        """Send one AnnouncePeerRequest with the given oneof member set."""


class NoScheduler:
    """Reports dropped: the peer downloads without a scheduler (none configured, or none reachable)."""

    def send(self, **oneof: Any) -> None:
        """Drop the report."""


class SchedulerStream:
    """An open AnnouncePeer stream for one peer of one task."""

    def __init__(self, stream: BidiStream, host_id: str, task_id: str, peer_id: str) -> None:
        self.stream = stream
        self.host_id, self.task_id, self.peer_id = host_id, task_id, peer_id

    def send(self, **oneof: Any) -> None:
        """Send one AnnouncePeerRequest with the given oneof member set."""
        self.stream.send(scheduler.AnnouncePeerRequest(host_id=self.host_id, task_id=self.task_id,
                                                       peer_id=self.peer_id, **oneof))


def piece_message(info: PieceInfo, traffic_type: common.TrafficType) -> common.Piece:
    """``common.v2.Piece`` for a piece just stored."""
    cost = duration_pb2.Duration()
    cost.FromNanoseconds(info.cost_ns)
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(info.created_at * 1e9) if info.created_at else time.time_ns())
    return common.Piece(number=info.number, parent_id=info.parent_id or None, offset=info.offset, length=info.length,
                        digest=info.digest, traffic_type=traffic_type, cost=cost, created_at=created)


def piece_finished(reporter: Reporter, info: PieceInfo) -> None:
    """Report a piece received from a parent."""
    reporter.send(download_piece_finished_request=scheduler.DownloadPieceFinishedRequest(
        piece=piece_message(info, common.REMOTE_PEER)))


def piece_failed(reporter: Reporter, number: int, parent_id: str) -> None:
    """Report a piece that failed on a parent; ``temporary`` makes the scheduler block that parent."""
    reporter.send(download_piece_failed_request=scheduler.DownloadPieceFailedRequest(
        piece_number=number, parent_id=parent_id, temporary=True))


def source_piece_finished(reporter: Reporter, info: PieceInfo) -> None:
    """Report a piece fetched from the origin."""
    reporter.send(download_piece_back_to_source_finished_request=scheduler.DownloadPieceBackToSourceFinishedRequest(
        piece=piece_message(info, common.BACK_TO_SOURCE)))


def source_piece_failed(reporter: Reporter, number: int) -> None:
    """Report a piece the origin would not give."""
    reporter.send(download_piece_back_to_source_failed_request=scheduler.DownloadPieceBackToSourceFailedRequest(
        piece_number=number))
