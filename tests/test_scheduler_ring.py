"""The consistent hash ring that maps task ids to schedulers."""

from __future__ import annotations

import collections
import hashlib

import pytest

from p2p.scheduler_ring import HashRing, SchedulerRing

ADDRESSES = [f"10.0.0.{i}:8002" for i in range(1, 6)]


def task_ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_pick_is_deterministic_and_order_independent() -> None:
    a, b = SchedulerRing(ADDRESSES), SchedulerRing(reversed(ADDRESSES))
    for task_id in task_ids(200):
        assert a.pick(task_id) == b.pick(task_id) in ADDRESSES


def test_key_is_first_five_hex_chars() -> None:
    ring = SchedulerRing(ADDRESSES)
    ids = task_ids(100)
    for task_id in ids:
        assert ring.pick(task_id) == ring.pick(task_id[:5] + "0" * 59) == ring.node_for(task_id[:5])
    assert len({ring.pick(t) for t in ids}) > 1


def test_spread_is_roughly_even() -> None:
    ring = SchedulerRing(ADDRESSES)
    counts = collections.Counter(ring.pick(t) for t in task_ids(5000))
    assert set(counts) == set(ADDRESSES)
    assert min(counts.values()) > 5000 / len(ADDRESSES) * 0.6


def test_without_moves_only_the_removed_nodes_keys() -> None:
    ring = SchedulerRing(ADDRESSES)
    gone = ADDRESSES[2]
    smaller = ring.without(gone)
    assert isinstance(smaller, SchedulerRing)
    assert gone not in smaller.nodes and len(smaller) == 4
    for task_id in task_ids(1000):
        before = ring.pick(task_id)
        assert smaller.pick(task_id) == before if before != gone else smaller.pick(task_id) != gone


def test_single_and_empty_rings() -> None:
    assert SchedulerRing(["a:1"]).pick("f" * 64) == "a:1"
    with pytest.raises(LookupError):
        SchedulerRing([]).pick("f" * 64)
    with pytest.raises(LookupError):
        HashRing(["x"]).without("x").node_for("k")
