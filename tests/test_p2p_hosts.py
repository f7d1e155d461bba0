"""The swarm across hosts: network namespaces on a bridge with 100 Mbit/s tc-limited links (tests/hosts.py).

Scheduler and seed peer on host 0, peers on hosts 1 and 2, docker-registry in the origin namespace. Registry
bytes are counted from its access log; where a peer's pieces came from, from its metrics.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import (
    HostBed,
    HostSwarm,
    leftover_links,
    leftover_namespaces,
    netns_registry,
    tools_missing,
    transfer_seconds,
)
from tests.registry_fixtures import REGISTRY_BIN
from tests.swarm import PeerDaemon, push_blob, sha256_file, swarm

pytestmark = pytest.mark.root

MiB = 1 << 20
RATE_MBIT = 100
SIZE = 20 * MiB


@pytest.fixture
def bed() -> Iterator[HostBed]:
    if reason := tools_missing():
        pytest.skip(reason)
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    with HostBed(3, rate_mbit=RATE_MBIT, origin_mbit=RATE_MBIT) as hosts:
        yield hosts
    assert not leftover_namespaces(), "host bed namespaces left behind"
    assert not leftover_links(), "host bed links left behind"


def _wait_announced(daemons: list[PeerDaemon]) -> None:
    deadline = time.monotonic() + 30
    for daemon in daemons:
        while "host announced" not in daemon.log_text():
            assert time.monotonic() < deadline, f"{daemon.name} never announced:\n{daemon.log_text()[-2000:]}"
            time.sleep(0.05)


def _get(process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"lazyfs get did not finish in {timeout} s") from None
    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
    assert process.returncode == 0, err


def test_second_host_gets_the_blob_from_peers(bed: HostBed, tmp_path: Path) -> None:
    h0, h1, h2 = bed.hosts
    with netns_registry(tmp_path / "registry", bed.origin) as registry:
        digest = push_blob(registry.url, "hosts/blob", os.urandom(SIZE))
        url = f"{registry.url}/v2/hosts/blob/blobs/{digest}"
        before = registry.bytes_served()
        with swarm(tmp_path / "swarm", HostSwarm) as group:
            sched = group.scheduler_on(h0)
            seed = group.peer_on(h0, "seed", [sched], seed=True)
            p1 = group.peer_on(h1, "peer1", [sched])
            p2 = group.peer_on(h2, "peer2", [sched])
            _wait_announced([seed, p1, p2])
            out1, out2 = tmp_path / "out1", tmp_path / "out2"
            _get(group.get_on(h1, p1, url, out1))
            _get(group.get_on(h2, p2, url, out2))
            assert sha256_file(out1) == digest
            assert sha256_file(out2) == digest
            origin = registry.bytes_served() - before
            metrics = p2.metrics()
    assert SIZE <= origin <= 1.05 * SIZE, f"registry served {origin} bytes for a {SIZE}-byte blob"
    from_others = metrics["lazyfs_peer_peer_bytes_total"] + metrics["lazyfs_peer_seed_bytes_total"]
    assert metrics["lazyfs_peer_source_bytes_total"] == 0, metrics
    assert from_others >= SIZE, metrics


def test_links_are_limited_both_ways(bed: HostBed) -> None:
    floor = SIZE * 8 / (RATE_MBIT * 1e6) * 0.9  # seconds at the limit, with 10 % slack
    h0, h1, _ = bed.hosts
    cases = {"host 0 upload": (h0, None), "host 1 download": (None, h1), "host to host": (h0, h1),
             "origin upload": (bed.origin, None)}
    for name, (sender, receiver) in cases.items():
        seconds = transfer_seconds(sender, receiver, SIZE)
        assert seconds >= floor, f"{name}: {SIZE} bytes in {seconds:.2f} s, faster than {RATE_MBIT} Mbit/s"
    h0.limit(None, None)
    assert transfer_seconds(h0, None, SIZE) < floor / 3, "lifting the limit did not speed the link up"


def test_bed_is_removed_after_a_failure() -> None:
    if reason := tools_missing():
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), HostBed(2):
        assert len(leftover_namespaces()) == 3  # two hosts and the origin
        raise RuntimeError("boom")
    assert not leftover_namespaces()
    assert not leftover_links()
