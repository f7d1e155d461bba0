"""The scheduler process: gRPC server, GC thread, logging and signal handling."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import grpc

from p2p.api import scheduler_grpc
from p2p.grpc_bridge import serve
from scheduler import logfmt
from scheduler.config import SchedulerConfig, load_config
from scheduler.gc import Collector
from scheduler.resources import Resources
from scheduler.service import SchedulerService

__all__ = ["SchedulerConfig", "SchedulerState", "load_config", "run", "start"]
log = logging.getLogger(__name__)
STOP_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """The live parts of a running scheduler, for tests and shutdown."""

    config: SchedulerConfig
    resources: Resources
    service: SchedulerService
    collector: Collector

    def stop(self, server: grpc.Server, grace: float = STOP_GRACE) -> None:
        """Stop the server (in-flight RPCs get *grace* seconds) and the GC thread."""
        server.stop(grace).wait()
        self.collector.stop()


def start(config: SchedulerConfig) -> tuple[grpc.Server, int, SchedulerState]:
    """Serve ``scheduler.v2.Scheduler`` (and health) on ``config.listen``; returns the server, bound port, state."""
    resources = Resources()
    service = SchedulerService(resources, config)

    def register(server: grpc.Server) -> None:
        scheduler_grpc.add_SchedulerServicer_to_server(service, server)  # type: ignore[no-untyped-call]

    server, port = serve(config.listen, register, workers=config.workers)
    collector = Collector(resources, config)
    collector.start()
    return server, port, SchedulerState(config, resources, service, collector)


def configure_logging(level: str) -> None:
    """Plain ``time level logger message`` lines; the messages are ``event key=value``."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run(config: SchedulerConfig) -> None:
    """Run the scheduler until SIGTERM or SIGINT (from the main thread)."""
    configure_logging(config.log_level)
    server, port, state = start(config)
    logfmt.log(log, logging.INFO, "scheduler_started", listen=config.listen, port=port)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    logfmt.log(log, logging.INFO, "scheduler_stopping")
    state.stop(server)
