"""Dragonfly's v2 gRPC API, from the pinned PyPI package ``dragonfly-api``, in one place.

Every lazyfs component imports the generated messages and stubs from here, so the pin and the module
names live in one file: ``common`` (common.v2), ``scheduler`` (scheduler.v2), ``dfdaemon`` (dfdaemon.v2).
"""

from __future__ import annotations

from typing import Any

import grpc
from dragonfly_api import common_pb2 as common
from dragonfly_api import dfdaemon_pb2 as dfdaemon
from dragonfly_api import dfdaemon_pb2_grpc as dfdaemon_grpc
from dragonfly_api import scheduler_pb2 as scheduler
from dragonfly_api import scheduler_pb2_grpc as scheduler_grpc

__all__ = ["common", "dfdaemon", "dfdaemon_grpc", "scheduler", "scheduler_grpc"]

HOST_TYPE_NORMAL = 0
HOST_TYPE_SEED = 1  # Dragonfly's "super" seed peer


def scheduler_stub(channel: grpc.Channel) -> Any:
    """A ``scheduler.v2.Scheduler`` client stub."""
    return scheduler_grpc.SchedulerStub(channel)  # type: ignore[no-untyped-call]


def upload_stub(channel: grpc.Channel) -> Any:
    """A ``dfdaemon.v2.DfdaemonUpload`` client stub (another peer's gRPC port)."""
    return dfdaemon_grpc.DfdaemonUploadStub(channel)  # type: ignore[no-untyped-call]


def download_stub(channel: grpc.Channel) -> Any:
    """A ``dfdaemon.v2.DfdaemonDownload`` client stub (the local peer's unix socket)."""
    return dfdaemon_grpc.DfdaemonDownloadStub(channel)  # type: ignore[no-untyped-call]
