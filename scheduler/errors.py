"""The one exception scheduler code raises to end an RPC with a gRPC status."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Ends the current RPC with *code* and *message*."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
