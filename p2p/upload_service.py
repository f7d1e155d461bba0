"""``dfdaemon.v2.DfdaemonUpload`` on the peer's gRPC port: what other peers and the scheduler ask of it.

SyncPieces streams the pieces a child wants as this peer holds them; SyncHost streams this host's load;
DownloadTask (the scheduler's way to start a seed, or to preheat) downloads and streams progress;
StatTask and DeleteTask act on the local task store. Handlers run on grpcio threads and reach the trio
loop through the :class:`~p2p.grpc_bridge.Portal`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from p2p.api import common, dfdaemon, dfdaemon_grpc
from p2p.download import Downloader, DownloadError, wanted_pieces
from p2p.grpc_bridge import Portal, StreamAborted
from p2p.storage import PieceInfo, Storage, StorageError, TaskInfo

HOST_SYNC_INTERVAL = 1.0
TASK_STATES = {"running": "Running", "succeeded": "Succeeded", "failed": "Failed"}


def task_message(info: TaskInfo, pieces: list[common.Piece]) -> common.Task:
    """``common.v2.Task`` for a local task."""
    return common.Task(id=info.task_id, type=common.STANDARD, url=info.url, content_length=info.content_length,
                       piece_count=info.piece_count, state=TASK_STATES.get(info.state, info.state), pieces=pieces,
                       peer_count=1, has_available_peer=info.finished_pieces > 0)


def stat_task(portal: Portal, storage: Storage, task_id: str, context: grpc.ServicerContext) -> common.Task:
    """StatTask for a local task, with the pieces held; NOT_FOUND if there is no such task."""
    info = portal.run_sync(storage.task, task_id)
    if info is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
    assert info is not None
    held = portal.run_sync(storage.pieces, task_id)
    return task_message(info, [common.Piece(number=p.number, offset=p.offset, length=p.length, digest=p.digest)
                               for p in sorted(held.values(), key=lambda p: p.number)])


async def task_progress(downloader: Downloader, download: common.Download) -> AsyncIterator[Any]:
    """DownloadTaskResponse messages for a download: started, then each wanted piece as it is stored."""
    job = await downloader.start(download)
    assert job.info is not None

    def answer(**oneof: Any) -> dfdaemon.DownloadTaskResponse:
        return dfdaemon.DownloadTaskResponse(host_id=downloader.config.host_id, task_id=job.task_id,
                                             peer_id=job.peer_id, **oneof)

    have = downloader.storage.pieces(job.task_id)
    wanted = [p.number for p in wanted_pieces(job.info, download)]  # a joined job may want more
    yield answer(download_task_started_response=dfdaemon.DownloadTaskStartedResponse(
        content_length=job.info.content_length, range=download.range if download.HasField("range") else None,
        is_finished=all(n in have for n in wanted)))
    try:
        async for piece in downloader.storage.watch(job.task_id, wanted):
            yield answer(download_piece_finished_response=(
                dfdaemon.DownloadPieceFinishedResponse(piece=common.Piece(
                    number=piece.number, offset=piece.offset, length=piece.length, digest=piece.digest,
                    parent_id=piece.parent_id or None, traffic_type=common.TrafficType.Name(piece.traffic_type)))))
    except StorageError:
        await job.done.wait()
        if job.error:
            raise DownloadError(job.error) from None
        raise
    await job.done.wait()
    if job.error:
        raise DownloadError(job.error)


class UploadService(dfdaemon_grpc.DfdaemonUploadServicer):
    """The servicer; *ip* and *vortex_port* are where children fetch piece bytes."""

    def __init__(self, portal: Portal, downloader: Downloader, host: Callable[[], common.Host], *, ip: str,
                 vortex_port: int) -> None:
        self.portal = portal
        self.downloader = downloader
        self.storage = downloader.storage
        self.host = host
        self.ip = ip
        self.vortex_port = vortex_port

    def _task(self, task_id: str, context: grpc.ServicerContext) -> TaskInfo:
        info = self.portal.run_sync(self.storage.task, task_id)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        assert info is not None
        return info

    def SyncPieces(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Each interested piece as soon as it is held; ends when all were sent, or, when no download of the
        task runs here, once the pieces held were sent (the others would never come)."""
        self._task(request.task_id, context)
        numbers = list(request.interested_piece_numbers) or None
        try:
            for piece in self.portal.iterate(lambda: self._pieces(request.task_id, numbers), context):
                yield dfdaemon.SyncPiecesResponse(number=piece.number, offset=piece.offset, length=piece.length,
                                                  ip=self.ip, tcp_port=self.vortex_port)
        except StorageError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except StreamAborted as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _pieces(self, task_id: str, numbers: list[int] | None) -> AsyncIterator[PieceInfo]:
        if task_id in self.downloader.jobs:
            async for piece in self.storage.watch(task_id, numbers):
                yield piece
            return
        held = self.storage.pieces(task_id)
        for number in sorted(held.keys() if numbers is None else set(numbers) & held.keys()):
            yield held[number]

    def SyncHost(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """This host, with its current upload rate, every second while the child listens."""
        while context.is_active():
            yield self.portal.run_sync(self.host)
            time.sleep(HOST_SYNC_INTERVAL)

    def DownloadTask(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Download the task here, streaming started and then one message per piece."""
        try:
            yield from self.portal.iterate(lambda: task_progress(self.downloader, request.download), context)
        except (DownloadError, StorageError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StreamAborted as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def StatTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The local task and its pieces."""
        return stat_task(self.portal, self.storage, request.task_id, context)

    def DeleteTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Delete the local task."""
        if not self.portal.run_sync(self.storage.delete_task, request.task_id):
            context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return empty_pb2.Empty()
