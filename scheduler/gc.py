"""TTL-based garbage collection of peers, tasks and hosts (Dragonfly's peer, task and host GC)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler import logfmt
from scheduler.config import SchedulerConfig
from scheduler.resources import Peer, PeerState, Resources

log = logging.getLogger(__name__)
_DOWNLOADING = frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE})
_GONE = frozenset({PeerState.FAILED, PeerState.LEAVE})


@dataclass(frozen=True, slots=True)
class Collected:
    """How much one pass removed."""

    hosts: int
    peers: int
    tasks: int


def _expired(peer: Peer, config: SchedulerConfig, now: float) -> bool:
    if peer.state in _GONE or now - peer.updated_at > config.peer_ttl:
        return True
    return peer.state in _DOWNLOADING and now - peer.piece_updated_at > config.piece_download_timeout


def collect(resources: Resources, config: SchedulerConfig, now: float) -> Collected:
    """One pass: hosts not announced within ``host_ttl`` (with their peers); failed, left or expired peers;
    tasks left without peers and without a seed trigger in flight."""
    with resources.lock:
        hosts = [h for h in resources.hosts.values() if now - h.announced_at > config.host_ttl]
        for host in hosts:
            resources.delete_host(host)
        peers = [p for t in resources.tasks.values() for p in t.peers.values() if _expired(p, config, now)]
        for peer in peers:
            resources.delete_peer(peer)
        tasks = [t for t in resources.tasks.values() if not t.peers and not t.seed_in_flight]
        for task in tasks:
            resources.delete_task(task)
    return Collected(len(hosts), len(peers), len(tasks))


class Collector:
    """A daemon thread running :func:`collect` every ``gc_interval`` seconds."""

    def __init__(self, resources: Resources, config: SchedulerConfig, clock: Callable[[], float] = time.time) -> None:
        self._resources = resources
        self._config = config
        self._clock = clock
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler-gc", daemon=True)

    def start(self) -> None:
        """Start collecting."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stopping.wait(self._config.gc_interval):
            done = collect(self._resources, self._config, self._clock())
            if done.hosts or done.peers or done.tasks:
                logfmt.log(log, logging.INFO, "gc", hosts=done.hosts, peers=done.peers, tasks=done.tasks)
