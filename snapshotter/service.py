"""The gRPC servicer of ``containerd.services.snapshots.v1.Snapshots``.

Each RPC checks and changes metadata in one :class:`~snapshotter.store.Store` transaction, keeps the
snapshot directories in step (:class:`~snapshotter.overlay.Layout`) and asks the
:class:`~snapshotter.backend.Backend` for mounts. :class:`~snapshotter.errors.SnapshotError` becomes
its gRPC status code; anything else is logged and answered UNKNOWN. The ``snapshotter`` field of the
requests is ignored: one server holds one set of snapshots, whatever name containerd registered it under.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.backend import Backend, Mount
from snapshotter.errors import FailedPrecondition, InvalidArgument, SnapshotError
from snapshotter.filters import compile_filters
from snapshotter.log import fields, log
from snapshotter.overlay import Layout, disk_usage
from snapshotter.store import Kind, Snapshot, Store, validate_labels

LIST_BATCH = 100
"""Infos per ListSnapshotsResponse message, as containerd's own service sends them."""

_KINDS = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


def _rpc(
    method: Callable[[SnapshotService, _Request, grpc.ServicerContext], _Response],
) -> Callable[[SnapshotService, _Request, grpc.ServicerContext], _Response]:
    """Answer SnapshotError with its status code and log every failure."""

    @functools.wraps(method)
    def handler(self: SnapshotService, request: _Request, context: grpc.ServicerContext) -> _Response:
        try:
            return method(self, request, context)
        except SnapshotError as exc:
            log.info("%s", fields(rpc=method.__name__, code=exc.code.name, error=str(exc)))
            context.abort(exc.code, str(exc))
        except Exception as exc:
            log.exception("%s", fields(rpc=method.__name__, code="UNKNOWN", error=str(exc)))
            context.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")

    return handler


def _namespace(context: grpc.ServicerContext) -> str | None:
    """The ``containerd-namespace`` of the request; containerd 1.6 sends none to proxy plugins."""
    return next((str(v) for k, v in context.invocation_metadata() if k == "containerd-namespace"), None)


class SnapshotService:
    """Serves the snapshots API over *store*, *layout* and *backend*."""

    def __init__(self, store: Store, layout: Layout, backend: Backend) -> None:
        self.store = store
        self.layout = layout
        self.backend = backend

    @_rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._create(Kind.ACTIVE, request.key, request.parent, request.labels, _namespace(context))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._create(Kind.VIEW, request.key, request.parent, request.labels, _namespace(context))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        with self.store.transaction() as tx:
            snapshot = tx.get(request.key)
            parents = tx.parents(snapshot)
        if snapshot.kind == Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {request.key!r} is committed: it has no mounts")
        return pb.MountsResponse(mounts=_mounts(self.backend.mounts(snapshot, parents)))

    @_rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        validate_labels(request.labels)
        active = self.store.get(request.key)
        if active.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {request.key!r} is not active")
        usage = self.backend.commit(active)
        with self.store.transaction() as tx:
            committed = tx.commit(request.key, request.name, request.labels, usage)
            parents = tx.parents(committed)
        self.backend.committed(committed, parents)
        log.info("%s", fields(rpc="Commit", ns=_namespace(context), key=request.key, name=request.name,
                              id=committed.id, size=usage.size, inodes=usage.inodes))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self.store.transaction() as tx:
            snapshot = tx.remove(request.key)
            self.backend.remove(snapshot)
            self.layout.discard(snapshot.id)
        self.layout.purge()
        log.info("%s", fields(rpc="Remove", ns=_namespace(context), key=request.key, id=snapshot.id))
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self.store.get(request.key)))

    @_rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        with self.store.transaction() as tx:
            current = tx.get(request.info.name)
            labels = updated_labels(current.labels, request.info.labels, request.update_mask.paths)
            snapshot = tx.set_labels(request.info.name, labels)
        log.info("%s", fields(rpc="Update", ns=_namespace(context), key=snapshot.key, labels=len(labels)))
        return pb.UpdateSnapshotResponse(info=_info(snapshot))

    @_rpc
    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        match = compile_filters(request.filters)
        with self.store.transaction() as tx:
            infos = [_info(s) for s in tx.all() if match(s)]
        return (pb.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH]) for i in range(0, len(infos), LIST_BATCH))

    @_rpc
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        snapshot = self.store.get(request.key)
        usage = disk_usage(self.layout.fs(snapshot.id)) if snapshot.kind == Kind.ACTIVE else snapshot.usage
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self.store.transaction() as tx:
            orphans = self.layout.orphans(tx.ids())
            for orphan in orphans:
                self.layout.discard(orphan)
        self.layout.purge()
        log.info("%s", fields(rpc="Cleanup", removed=len(orphans)))
        return empty_pb2.Empty()

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], namespace: str | None
    ) -> list[Mount]:
        """Record a snapshot, make its directories and ask the backend for its mounts."""
        with self.store.transaction() as tx:
            snapshot = tx.create(kind, key, parent, labels)
            parents = tx.parents(snapshot)
            self.layout.create(snapshot)
        try:
            mounts = self.backend.prepare(snapshot, parents)
        except BaseException:
            self._undo(snapshot)
            raise
        log.info("%s", fields(rpc="Prepare" if kind == Kind.ACTIVE else "View", ns=namespace, key=key,
                              parent=parent, id=snapshot.id, mount=mounts[0].type if mounts else "none"))
        return mounts

    def _undo(self, snapshot: Snapshot) -> None:
        """Delete a snapshot whose preparation failed, unless its key is gone or reused."""
        with self.store.transaction() as tx:
            current = tx.find(snapshot.key)
            if current is None or current.id != snapshot.id:
                return
            tx.remove(snapshot.key)
            self.layout.discard(snapshot.id)
        self.layout.purge()


def updated_labels(current: Mapping[str, str], given: Mapping[str, str], paths: Sequence[str]) -> dict[str, str]:
    """Labels after an Update: all of *given* without *paths*, else ``labels`` / ``labels.<key>`` paths.

    A ``labels.<key>`` path whose key is missing (or empty) in *given* deletes that label.
    """
    if not paths:
        return dict(given)
    labels = dict(current)
    for path in paths:
        if path == "labels":
            labels = dict(given)
        elif path.startswith("labels."):
            name = path.removeprefix("labels.")
            if given.get(name):
                labels[name] = given[name]
            else:
                labels.pop(name, None)
        else:
            raise InvalidArgument(f"cannot update field {path!r} of a snapshot: only labels can change")
    return labels


def _info(snapshot: Snapshot) -> pb.Info:
    info = pb.Info(name=snapshot.key, parent=snapshot.parent, kind=_KINDS[snapshot.kind], labels=snapshot.labels)
    info.created_at.FromNanoseconds(snapshot.created_ns)
    info.updated_at.FromNanoseconds(snapshot.updated_ns)
    return info


def _mounts(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]
