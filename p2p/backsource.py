"""Back-to-source: a task's missing pieces fetched from the origin, a few at a time, each stored and reported."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import trio

from p2p import reporter as report
from p2p.api import common
from p2p.direct_io import aligned_buffer
from p2p.pieces import Piece, pieces
from p2p.storage import Storage, StorageError, TaskInfo
from seed.origin import Origin, OriginError

log = logging.getLogger("lazyfs.peer")


class SourceFailed(Exception):
    """The origin could not give a piece after the origin client's retries."""


async def fetch_from_source(storage: Storage, origin: Origin, download: common.Download, task_id: str,
                            wanted: Iterable[Piece], reporter: report.Reporter, *, concurrency: int) -> int:
    """Fetch every piece in *wanted* from the origin in order; returns the bytes fetched."""
    queue = iter(list(wanted))
    headers = dict(download.request_header)
    fetched = 0

    async def worker() -> None:
        nonlocal fetched
        buffer = aligned_buffer(0)  # one per worker, reused piece after piece (and written to disk directly)
        for piece in queue:
            start = time.monotonic_ns()
            if len(buffer) < piece.length:
                buffer = aligned_buffer(piece.length)
            try:
                data = await origin.read(download.url, headers, piece.offset, piece.length, into=buffer)
            except OriginError as exc:
                report.source_piece_failed(reporter, piece.number)
                raise SourceFailed(f"piece {piece.number} of task {task_id}: {exc}") from exc
            info = await storage.write_piece_async(task_id, piece.number, data, parent_id="",
                                                   traffic_type=common.BACK_TO_SOURCE,
                                                   cost_ns=time.monotonic_ns() - start)
            fetched += len(data)
            report.source_piece_finished(reporter, info)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, concurrency)):
                nursery.start_soon(worker)
    except* (SourceFailed, StorageError) as group:
        raise group.exceptions[0] from None  # the first failure says it; the others were cancelled with it
    log.info("back-to-source done task=%s bytes=%d", task_id, fetched)
    return fetched


async def stream_from_source(storage: Storage, origin: Origin, download: common.Download, task: TaskInfo,
                             reporter: report.Reporter) -> int:
    """For an origin that ignores Range: read the whole content once, storing each piece as it fills."""
    held = storage.pieces(task.task_id)
    layout = iter(pieces(task.content_length, task.piece_length))
    piece = next(layout, None)
    buffer = bytearray()
    start = time.monotonic_ns()
    try:
        async for chunk in origin.stream(download.url, dict(download.request_header), task.content_length):
            buffer += chunk
            while piece is not None and len(buffer) >= piece.length:
                data = bytes(buffer[: piece.length])
                del buffer[: piece.length]
                if piece.number not in held:
                    info = await storage.write_piece_async(task.task_id, piece.number, data, parent_id="",
                                               traffic_type=common.BACK_TO_SOURCE, cost_ns=time.monotonic_ns() - start)
                    report.source_piece_finished(reporter, info)
                piece, start = next(layout, None), time.monotonic_ns()
    except OriginError as exc:
        if piece is not None:
            report.source_piece_failed(reporter, piece.number)
        raise SourceFailed(f"task {task.task_id}: {exc}") from exc
    log.info("back-to-source done task=%s bytes=%d ranges=no", task.task_id, task.content_length)
    return task.content_length
