"""Consistent hashing of task ids onto schedulers (and of tasks onto seed peers).

Dragonfly keeps a standard task's state in one scheduler's memory, so every peer of a task must pick the
same scheduler. Its Rust client puts scheduler addresses on a ring from the ``hashring`` crate (SipHash,
virtual nodes) and looks up the key ``task_id[0:5]``, the first 5 hex characters of the task id.

This ring follows the same rule (virtual nodes, key ``task_id[0:5]``) but hashes with SHA-256, so it is
equivalent by design, not byte-compatible: all lazyfs peers agree with each other, but a lazyfs peer and a
Rust dfdaemon may pick different schedulers for one task when there are several schedulers.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

TASK_KEY_LENGTH = 5
VIRTUAL_NODES = 160


def _point(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashRing:
    """A consistent hash ring of string nodes, each placed at *virtual_nodes* points."""

    def __init__(self, nodes: Iterable[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        self._virtual_nodes = virtual_nodes
        ring = sorted((_point(f"{node}#{i}"), node) for node in self.nodes for i in range(virtual_nodes))
        self._points = [point for point, _ in ring]
        self._owners = [node for _, node in ring]

    def node_for(self, key: str) -> str:
        """The node owning *key*: the first point clockwise from the key's hash; LookupError when empty."""
        if not self._points:
            raise LookupError("hash ring is empty")
        index = bisect.bisect_right(self._points, _point(key)) % len(self._points)
        return self._owners[index]

    def without(self, node: str) -> HashRing:
        """A ring of the same nodes but *node* (keys it owned move to their next node)."""
        return HashRing((n for n in self.nodes if n != node), self._virtual_nodes)

    def __len__(self) -> int:
        return len(self.nodes)


class SchedulerRing(HashRing):
    """Scheduler addresses (``host:port``) on a ring keyed by ``task_id[0:5]``, as Dragonfly's client does."""

    def pick(self, task_id: str) -> str:
        """The scheduler that owns *task_id*."""
        return self.node_for(task_id[:TASK_KEY_LENGTH])

    def without(self, node: str) -> SchedulerRing:
        """The ring without *node*, for failing over from an unhealthy scheduler."""
        return SchedulerRing((n for n in self.nodes if n != node), self._virtual_nodes)
