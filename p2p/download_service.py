"""``dfdaemon.v2.DfdaemonDownload`` on the peer's unix socket: downloads for local clients (``lazyfs get``).

DownloadTask streams progress like the upload port's, then writes ``output_path``: a hard link to the task's
content file when the whole content is asked for and the output is on the same filesystem (as Dragonfly's
client does; no copy), else a copy made in the kernel (``force_hard_link`` turns that fallback into an error).
Local tasks can be listed, inspected and deleted.
"""

from __future__ import annotations

import errno
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
    partial = _partial(output, overwrite)
    with open(partial, "wb") as out:
        done = 0
        while done < length:
            copied = _copy(source_fd, out.fileno(), min(COPY_CHUNK, length - done), offset + done)
            if copied == 0:
                raise DownloadError(f"task content ended after {done} of {length} bytes")
            done += copied
    partial.replace(output)


def _copy(source_fd: int, out_fd: int, size: int, offset: int) -> int:
    """Bytes copied in the kernel: copy_file_range, or sendfile across filesystems where it refuses."""
    try:
        return os.copy_file_range(source_fd, out_fd, size, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return os.sendfile(out_fd, source_fd, offset, size)


def link_output(content: Path, output: Path, *, overwrite: bool) -> bool:
    """Hard-link a task's whole content file to *output* (atomically by rename); False where links cannot go
    (another filesystem, a filesystem without links)."""
    partial = _partial(output, overwrite)
    partial.unlink(missing_ok=True)
    try:
        os.link(content, partial)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    partial.replace(output)
    return True


def _partial(output: Path, overwrite: bool) -> Path:
    if output.exists() and not overwrite:
        raise DownloadError(f"{output} exists (set overwrite)")
    return output.with_name(f".{output.name}.lazyfs-partial")


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
        output = Path(download.output_path)
        if (start, length) == (0, info.content_length) and info.state == "succeeded":
            content = self.storage.content_path(tid)
            if await trio.to_thread.run_sync(lambda: link_output(content, output, overwrite=download.overwrite)):
                return
        if download.force_hard_link:
            raise DownloadError(f"cannot hard-link task {tid} to {output} (another filesystem, or a range)")
        with self.storage.content_fd(tid) as fd:
            await trio.to_thread.run_sync(lambda: write_output(fd, output, start, length,
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
