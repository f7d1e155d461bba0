"""Snapshotter errors, each carrying the gRPC status code containerd maps to its error class."""

from __future__ import annotations

from typing import ClassVar

import grpc

from lazyfs.errors import LazyfsError


class SnapshotError(LazyfsError):
    """An error answered to the client with :attr:`code` and the exception's message."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


class NotFound(SnapshotError):
    """The snapshot (or its parent) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    """The key or name is taken (also the remote-snapshot answer to a Prepare with a target)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    """The snapshot is in the wrong state: it has children, or it is not active."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotError):
    """Bad input: oversized labels, an unknown field path, a malformed filter, a parent that is not committed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(SnapshotError):
    """Data the snapshot needs cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE
