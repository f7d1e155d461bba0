"""Candidate-parent scheduling: Dragonfly's ScheduleCandidateParents and its filters (protocol doc §3.1)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import grpc

from p2p.api import scheduler
from scheduler import logfmt
from scheduler.config import SchedulerConfig
from scheduler.convert import peer_proto
from scheduler.errors import ServiceError
from scheduler.evaluator import evaluate, is_bad_parent
from scheduler.resources import Peer, PeerState, Resources

log = logging.getLogger(__name__)
_ROOT_STATES = frozenset({PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED})
_GONE = frozenset({PeerState.FAILED, PeerState.LEAVE})


class Scheduling:
    """Picks parents for peers, retrying in rounds, or sends them back to source."""

    def __init__(self, resources: Resources, config: SchedulerConfig, *,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        self._resources = resources
        self._config = config
        self._sleep = sleep
        self._rng = rng or random.Random()

    def schedule(self, peer: Peer, alive: Callable[[], bool]) -> scheduler.AnnouncePeerResponse:
        """A NormalTaskResponse or NeedBackToSourceResponse for *peer*, after up to ``retry_limit`` rounds.

        Raises ServiceError: FAILED_PRECONDITION when rounds run out (or the peer is gone), CANCELLED when
        *alive* says the client left. Sleeps between rounds without the resource lock.
        """
        attempt = 0
        while True:
            with self._resources.lock:
                response = self._round(peer, attempt)
            if response is not None:
                return response
            if not alive():
                raise ServiceError(grpc.StatusCode.CANCELLED, "client left while scheduling")
            attempt += 1
            self._sleep(self._config.retry_interval)

    def _round(self, peer: Peer, attempt: int) -> scheduler.AnnouncePeerResponse | None:
        task = peer.task
        if peer.state in _GONE:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"peer {peer.id} is {peer.state}")
        if task.can_back_to_source(peer.id, self._config.back_to_source_count):
            if peer.need_back_to_source:
                return self._back_to_source(peer, "peer needs back-to-source")
            if attempt >= self._config.retry_back_to_source_limit:
                return self._back_to_source(peer, "scheduling exceeded RetryBackToSourceLimit")
        if attempt >= self._config.retry_limit:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "scheduling exceeded RetryLimit")
        task.remove_in_edges(peer.id)
        parents = self.find_candidate_parents(peer)
        if not parents:
            logfmt.log(log, logging.DEBUG, "no_candidate_parents", task=task.id, peer=peer.id, attempt=attempt)
            return None
        for parent in parents:
            task.add_edge(parent, peer)
        logfmt.log(log, logging.INFO, "scheduled", task=task.id, peer=peer.id,
                   parents=",".join(p.id for p in parents))
        normal = scheduler.NormalTaskResponse(candidate_parents=[peer_proto(p) for p in parents])
        return scheduler.AnnouncePeerResponse(normal_task_response=normal)

    def _back_to_source(self, peer: Peer, why: str) -> scheduler.AnnouncePeerResponse:
        peer.task.back_to_source_peers.add(peer.id)
        logfmt.log(log, logging.INFO, "back_to_source", task=peer.task.id, peer=peer.id, reason=why)
        need = scheduler.NeedBackToSourceResponse(description=why)
        return scheduler.AnnouncePeerResponse(need_back_to_source_response=need)

    def find_candidate_parents(self, peer: Peer) -> list[Peer]:
        """The best ``candidate_parent_limit`` eligible parents among a random ``filter_parent_limit`` sample."""
        others = [p for p in peer.task.peers.values() if p.id != peer.id]
        sample = self._rng.sample(others, min(self._config.filter_parent_limit, len(others)))
        eligible = [p for p in sample if self.eligible(p, peer)]
        eligible.sort(key=lambda p: evaluate(p, peer), reverse=True)
        return eligible[:self._config.candidate_parent_limit]

    @staticmethod
    def eligible(parent: Peer, child: Peer) -> bool:
        """Dragonfly's parent filters, in order."""
        task = child.task
        if parent.id in child.block_parents or parent.host.proto.disable_shared:
            return False
        if parent.host is child.host or parent.id not in task.peers:
            return False
        if not parent.host.is_seed and task.in_degree(parent.id) == 0 and parent.state not in _ROOT_STATES:
            return False
        if not parent.may_supply(child.wanted_pieces()):  # it would never send some pieces the child waits for
            return False
        return not is_bad_parent(parent) and task.can_add_edge(parent.id, child.id)
