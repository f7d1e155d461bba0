"""Seed triggering: asking a seed peer to download a new task from source (protocol doc §2.4)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from p2p.api import common, dfdaemon, dfdaemon_grpc
from p2p.grpc_bridge import channel
from p2p.scheduler_ring import HashRing
from scheduler import logfmt
from scheduler.config import SchedulerConfig
from scheduler.resources import Host, Resources, Task

log = logging.getLogger(__name__)


def seed_request(download: common.Download) -> dfdaemon.DownloadTaskRequest:
    """The peer's download with ``need_back_to_source`` set and ``output_path`` cleared."""
    copy = common.Download()
    copy.CopyFrom(download)
    copy.need_back_to_source = True
    copy.ClearField("output_path")
    return dfdaemon.DownloadTaskRequest(download=copy)


class SeedTrigger:
    """Starts at most one seed download per task, on a background thread, and records failures on the task."""

    def __init__(self, resources: Resources, config: SchedulerConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self._resources = resources
        self._config = config
        self._clock = clock

    def pick(self, task_id: str) -> Host | None:
        """The seed host for *task_id* by consistent hash of the id, or None without seeds (lock held)."""
        seeds = {h.id: h for h in self._resources.seeds()}
        if not seeds:
            return None
        return seeds[HashRing(seeds).node_for(task_id)]

    def start(self, task: Task, seed: Host, download: common.Download) -> None:
        """Mark the task's trigger in flight and call the seed's ``DownloadTask`` in the background (lock held)."""
        task.seed_in_flight = True
        target = f"{seed.proto.ip}:{seed.proto.port}"
        logfmt.log(log, logging.INFO, "seed_trigger", task=task.id, seed=seed.id, target=target)
        thread = threading.Thread(target=self._download, args=(task, target, seed_request(download)),
                                  name=f"seed-{task.id[:8]}", daemon=True)
        thread.start()

    def _download(self, task: Task, target: str, request: dfdaemon.DownloadTaskRequest) -> None:
        error: str | None = None
        try:
            with channel(target) as chan:
                stub = dfdaemon_grpc.DfdaemonUploadStub(chan)  # type: ignore[no-untyped-call]
                for _ in stub.DownloadTask(request, timeout=self._config.seed_download_timeout):
                    pass
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        with self._resources.lock:
            task.seed_in_flight = False
            if error is not None:
                task.seed_failed_at = self._clock()
        if error is None:
            logfmt.log(log, logging.INFO, "seed_done", task=task.id, target=target)
        else:
            logfmt.log(log, logging.WARNING, "seed_failed", task=task.id, target=target, error=error)
