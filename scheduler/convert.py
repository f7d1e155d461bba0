"""The scheduler's resources as ``common.v2`` messages, and reported pieces back into records."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from p2p.api import common
from scheduler.resources import Peer, PieceRecord, Task


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of a Unix time."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration of *seconds*."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def piece_record(piece: common.Piece, now: float) -> PieceRecord:
    """A reported piece as stored; cost in seconds, creation time defaulting to *now*."""
    cost = piece.cost.ToNanoseconds() / 1e9 if piece.HasField("cost") else 0.0
    created = piece.created_at.ToNanoseconds() / 1e9 if piece.HasField("created_at") else now
    return PieceRecord(piece.number, piece.offset, piece.length, piece.digest,
                       piece.parent_id if piece.HasField("parent_id") else None,
                       piece.traffic_type if piece.HasField("traffic_type") else None, cost, created)


def piece_proto(record: PieceRecord) -> common.Piece:
    """A stored piece as ``common.v2.Piece`` (without content)."""
    piece = common.Piece(number=record.number, offset=record.offset, length=record.length, digest=record.digest,
                         cost=duration(record.cost), created_at=timestamp(record.created_at))
    if record.parent_id is not None:
        piece.parent_id = record.parent_id
    if record.traffic_type is not None:
        piece.traffic_type = record.traffic_type  # type: ignore[assignment]
    return piece


def task_proto(task: Task, *, with_pieces: bool = True) -> common.Task:
    """``common.v2.Task``: layout, state, peer count, availability and (optionally) pieces."""
    d = task.download
    proto = common.Task(
        id=task.id, type=d.type, url=d.url, filtered_query_params=d.filtered_query_params,
        request_header=d.request_header, content_length=max(task.content_length, 0), piece_count=task.piece_count,
        size_scope=task.size_scope(), state=str(task.state), peer_count=len(task.peers),  # type: ignore[arg-type]
        has_available_peer=task.has_available_peer(exclude=""),
        created_at=timestamp(task.created_at), updated_at=timestamp(task.updated_at))
    for name in ("digest", "tag", "application"):
        if d.HasField(name):
            setattr(proto, name, getattr(d, name))
    if with_pieces:
        proto.pieces.extend(piece_proto(task.pieces[n]) for n in sorted(task.pieces))
    return proto


def peer_proto(peer: Peer) -> common.Peer:
    """``common.v2.Peer`` with its pieces, task (without pieces) and host."""
    proto = common.Peer(
        id=peer.id, priority=peer.priority, state=str(peer.state),  # type: ignore[arg-type]
        need_back_to_source=peer.need_back_to_source, concurrent_piece_count=peer.concurrent_piece_count,
        cost=duration(peer.updated_at - peer.created_at), task=task_proto(peer.task, with_pieces=False),
        host=peer.host.proto, created_at=timestamp(peer.created_at), updated_at=timestamp(peer.updated_at))
    if peer.range is not None:
        proto.range.start, proto.range.length = peer.range
    proto.pieces.extend(piece_proto(peer.pieces[n]) for n in sorted(peer.pieces))
    return proto
