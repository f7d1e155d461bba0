"""A real swarm: docker-registry as the origin, ``lazyfs scheduler``, seed peers and peers as separate processes.

Registry bytes are counted from docker-registry's own access log; piece sources from each peer's metrics.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.registry_fixtures import RegistryServer, Response, local_http_server, scripted_handler
from tests.swarm import PeerDaemon, Swarm, push_blob, sha256_file, swarm

pytestmark = pytest.mark.root

MiB = 1 << 20


def _blob(size: int) -> bytes:
    return os.urandom(size)


def _wait_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"lazyfs get did not finish in {timeout} s") from None
        err = process.stderr.read().decode() if process.stderr else ""
        assert process.returncode == 0, err


def _blob_url(registry: RegistryServer, digest: str) -> str:
    return f"{registry.url}/v2/swarm/blob/blobs/{digest}"


def test_swarm_of_eight_peers_costs_the_origin_one_copy(registry: RegistryServer, tmp_path: Path) -> None:
    data = _blob(200 * MiB)
    digest = push_blob(registry.url, "swarm/blob", data)
    del data
    before = registry.bytes_served()
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        group.peer("seed", [sched], seed=True)
        peers = [group.peer(f"peer{i}", [sched]) for i in range(8)]
        time.sleep(0.5)  # hosts announced
        outputs = [tmp_path / f"out{i}" for i in range(8)]
        gets = [group.get(p, _blob_url(registry, digest), out) for p, out in zip(peers, outputs, strict=True)]
        _wait_all(gets, 300)
        for out in outputs:
            assert sha256_file(out) == digest
        origin = registry.bytes_served() - before
        assert origin <= 1.1 * 200 * MiB, f"registry served {origin} bytes for a {200 * MiB}-byte blob"
        received = {p.name: p.metrics() for p in peers}
    from_peers = sum(m["lazyfs_peer_peer_bytes_total"] for m in received.values())
    from_seed = sum(m["lazyfs_peer_seed_bytes_total"] for m in received.values())
    from_source = sum(m["lazyfs_peer_source_bytes_total"] for m in received.values())
    total = from_peers + from_seed + from_source
    assert total >= 8 * 200 * MiB
    split = f"from peers {from_peers:.0f}, seed {from_seed:.0f}, source {from_source:.0f} of {total:.0f}"
    print(split)
    assert from_peers >= total / 2, split


def _seed_and_parent(group: Swarm, sched: str) -> PeerDaemon:
    group.peer("seed", [sched], seed=True)
    return group.peer("a", [sched])


def test_killed_parent_children_reschedule_and_finish(registry: RegistryServer, tmp_path: Path) -> None:
    digest = push_blob(registry.url, "swarm/blob", _blob(64 * MiB))
    url = _blob_url(registry, digest)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        parent = _seed_and_parent(group, sched)
        _wait_all([group.get(parent, url, tmp_path / "a")], 120)
        group.kill("seed")  # the parent is now the only holder
        child = group.peer("b", [sched], "--download-limit", "8M")
        get = group.get(child, url, tmp_path / "b")
        time.sleep(3)  # mid-transfer: about 24 of 64 MiB
        group.kill("a")
        _wait_all([get], 120)
        assert sha256_file(tmp_path / "b") == digest
        log = child.log_text()
        assert "piece failed" in log or "sync-pieces ended" in log, log[-3000:]


def test_killed_scheduler_peers_fall_back_then_register_again(registry: RegistryServer, tmp_path: Path) -> None:
    digest = push_blob(registry.url, "swarm/blob", _blob(24 * MiB))
    url = _blob_url(registry, digest)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        a = group.peer("a", [sched])
        group.kill("scheduler")
        _wait_all([group.get(a, url, tmp_path / "a")], 120)  # no scheduler: straight from the source
        assert sha256_file(tmp_path / "a") == digest
        port = sched.rsplit(":", 1)[1]
        group.scheduler("scheduler2", port=int(port))
        deadline = time.monotonic() + 20
        while "tasks announced" not in a.log_text():
            assert time.monotonic() < deadline, a.log_text()[-2000:]
            time.sleep(0.2)
        before = registry.bytes_served()
        b = group.peer("b", [sched])
        _wait_all([group.get(b, url, tmp_path / "b", "--disable-back-to-source")], 120)
        assert sha256_file(tmp_path / "b") == digest
        assert registry.bytes_served() - before < MiB  # only b's own stat (HEAD) touched the origin
        assert b.metrics()["lazyfs_peer_peer_bytes_total"] == 24 * MiB


def test_corrupt_parent_is_caught_blocked_and_download_completes(registry: RegistryServer, tmp_path: Path) -> None:
    digest = push_blob(registry.url, "swarm/blob", _blob(16 * MiB))
    url = _blob_url(registry, digest)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        parent = _seed_and_parent(group, sched)
        _wait_all([group.get(parent, url, tmp_path / "a")], 120)
        group.kill("seed")
        for content in (parent.data_dir / "content" / "tasks").rglob("*"):
            if content.is_file():
                with content.open("r+b") as f:  # flip a byte in every piece; the recorded crc32s stay
                    for offset in range(0, content.stat().st_size, 4 * MiB):
                        f.seek(offset + 100)
                        byte = f.read(1)
                        f.seek(offset + 100)
                        f.write(bytes([byte[0] ^ 0xFF]))
        child = group.peer("b", [sched])
        _wait_all([group.get(child, url, tmp_path / "b")], 120)
        assert sha256_file(tmp_path / "b") == digest
        assert "kind=corrupt" in child.log_text()


@pytest.mark.parametrize("failure", ["500", "hang"])
def test_origin_failure_reaches_the_client_after_bounded_retries(failure: str, tmp_path: Path) -> None:
    release = threading.Event()

    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        if failure == "hang":
            release.wait(60)
        return 500, {}, b"broken origin"

    config = tmp_path / "peer.toml"
    config.write_text("source_timeout = 1.0\nsource_retries = 3\n")
    try:
        with local_http_server(scripted_handler(respond)) as origin, swarm(tmp_path / "swarm") as group:
            sched = group.scheduler()
            group.peer("seed", [sched], "--config", str(config), seed=True)
            peer = group.peer("a", [sched], "--config", str(config))
            started = time.monotonic()
            get = group.get(peer, f"{origin}/model.bin", tmp_path / "out")
            get.wait(timeout=60)
            elapsed = time.monotonic() - started
            message = get.stderr.read().decode() if get.stderr else ""
    finally:
        release.set()
    assert get.returncode != 0
    expected = "500" if failure == "500" else "within 1 s"
    assert expected in message and "after 3 attempts" in message, message
    assert elapsed < 20
    assert not (tmp_path / "out").exists()


def test_upload_limit_caps_what_a_parent_serves(registry: RegistryServer, tmp_path: Path) -> None:
    limit = 8_000_000
    digest = push_blob(registry.url, "swarm/blob", _blob(32 * MiB))
    url = _blob_url(registry, digest)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        group.peer("seed", [sched], seed=True)
        parent = group.peer("a", [sched], "--upload-limit", str(limit))
        _wait_all([group.get(parent, url, tmp_path / "a")], 120)
        group.kill("seed")  # the limited parent is now the only holder
        child = group.peer("b", [sched])
        started = time.monotonic()
        _wait_all([group.get(child, url, tmp_path / "b", "--disable-back-to-source")], 120)
        elapsed = time.monotonic() - started
        served = parent.metrics()["lazyfs_peer_upload_bytes_total"]
    assert sha256_file(tmp_path / "b") == digest
    assert served == 32 * MiB
    assert served / elapsed <= 1.1 * limit, f"{served / elapsed:.0f} B/s through a {limit} B/s limit"
