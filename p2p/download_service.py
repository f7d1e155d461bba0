"""``dfdaemon.v2.DfdaemonDownload`` on the peer's unix socket: downloads for local clients (``lazyfs get``).

DownloadTask streams progress like the upload port's, then writes ``output_path`` (a copy made in the
kernel, or a hard link when asked and possible). Local tasks can be listed, inspected and deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import trio
from google.protobuf import empty_pb2, timestamp_pb2

from p2p.api import common, dfdaemon, dfdaemon_grpc
from p2p.download import Downloader, DownloadError, download_task_id, wanted_pieces
from p2p.grpc_bridge import Portal, StreamAborted
from p2p.storage import StorageError, TaskInfo
from p2p.upload_service import stat_task, task_progress

COPY_CHUNK = 64 << 20


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def local_task(info: TaskInfo) -> dfdaemon.StatLocalTaskResponse:
    """StatLocalTaskResponse for a local task."""
    return dfdaemon.StatLocalTaskResponse(task_id=info.task_id, piece_length=info.piece_length,
                                          content_length=info.content_length, created_at=_stamp(info.created_at),
                                          updated_at=_stamp(info.updated_at),
                                          finished_at=_stamp(info.updated_at) if info.state == "succeeded" else None,
                                          failed_at=_stamp(info.updated_at) if info.state == "failed" else None)


def write_output(source_fd: int, output: Path, offset: int, length: int, *, overwrite: bool) -> None:
    """Copy *length* bytes at *offset* of a task's content to *output*, atomically by rename."""
    if output.exists() and not overwrite:
        raise DownloadError(f"{output} exists (set overwrite)")
    partial = output.with_name(f".{output.name}.lazyfs-partial")
    with open(partial, "wb") as out:
        done = 0
        while done < length:
            copied = os.copy_file_range(source_fd, out.fileno(), min(COPY_CHUNK, length - done), offset + done)
            if copied == 0:
                raise DownloadError(f"task content ended after {done} of {length} bytes")
            done += copied
    partial.replace(output)


class DownloadService(dfdaemon_grpc.DfdaemonDownloadServicer):
    """The servicer."""

    def __init__(self, portal: Portal, downloader: Downloader) -> None:
        self.portal = portal
        self.downloader = downloader
        self.storage = downloader.storage

    def DownloadTask(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Download, streaming progress, then write the output file if one was asked for."""
        download = request.download
        if download.HasField("output_path") and not os.path.isabs(download.output_path):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output path {download.output_path!r} is not absolute")
        try:
            yield from self.portal.iterate(lambda: task_progress(self.downloader, download), context)
            if download.HasField("output_path"):
                self.portal.run(self._output, download)
        except (DownloadError, StorageError, OSError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StreamAborted as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _output(self, download: common.Download) -> None:
        tid = download_task_id(download)
        info = self.storage.task(tid)
        if info is None:
            raise DownloadError(f"task {tid} vanished before its output was written")
        held = self.storage.pieces(tid)
        if any(p.number not in held for p in wanted_pieces(info, download)):
            raise DownloadError(f"task {tid} is missing pieces: no output written")
        start = download.range.start if download.HasField("range") else 0
        length = download.range.length if download.HasField("range") and download.range.length else (
            info.content_length - start)
        with self.storage.content_fd(tid) as fd:
            await trio.to_thread.run_sync(lambda: write_output(fd, Path(download.output_path), start, length,
                                                               overwrite=download.overwrite))

    def StatTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The local task as ``common.v2.Task``, with the pieces held."""
        return stat_task(self.portal, self.storage, request.task_id, context)

    def StatLocalTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        """One local task."""
        info = self.portal.run_sync(self.storage.task, request.task_id)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return local_task(info)

    def ListLocalTasks(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Every local task."""
        return dfdaemon.ListLocalTasksResponse(tasks=[local_task(t) for t in self.portal.run_sync(self.storage.tasks)])

    def DeleteTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Delete a local task."""
        if not self.portal.run_sync(self.storage.delete_task, request.task_id):
            context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        return empty_pb2.Empty()

    DeleteLocalTask = DeleteTask
