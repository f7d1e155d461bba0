"""The peer's registry mirror / HTTP proxy (p2p/proxy.py) against a real docker-registry.

In-process: ``p2p.daemon.serve`` with ``proxy_port`` in the test's nursery (no scheduler, so P2P downloads go
back to source), clients with httpx. Then the acceptance test of issue 5: two private containerds, each
pulling through its own peer (hosts.toml mirror, ``ctr --hosts-dir``), with a scheduler and a seed peer as
real processes: the second pull costs the registry no blob bytes, and both images run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lazyfs.registry.manifest import OCI_MANIFEST
from p2p.config import PeerConfig
from p2p.daemon import Peer, serve
from p2p.proxy import ByteRange, Unsatisfiable, end_to_end, parse_range
from snapshotter.mirror import hosts_toml
from tests.containerd_fixtures import Containerd, SnapshotterProcess, log_tail
from tests.registry_fixtures import (
    PASSWORD,
    USERNAME,
    PushedImage,
    RegistryServer,
    Response,
    free_port,
    local_http_server,
    push_test_image,
    scripted_handler,
)
from tests.swarm import swarm
from tests.test_snapshotter import busybox_layers

SNAPSHOTTER = "lazyfs"

MiB = 1 << 20
BLOB = os.urandom(10 * MiB + 12345)  # three 4 MiB pieces, the last one short
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for the peer's unix socket."""
    path = Path(tempfile.mkdtemp(prefix="lzpx", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def proxy_peer(root: Path, **overrides: Any) -> AsyncIterator[tuple[Peer, str]]:
    """An in-process peer with its proxy on a free port; yields the peer and ``http://127.0.0.1:PORT``."""
    values: dict[str, Any] = {"data_dir": root / "peer", "socket": root / "peer.sock", "listen": "127.0.0.1",
                              "ip": "127.0.0.1", "grpc_port": 0, "vortex_port": 0, "metrics_port": 0,
                              "hostname": "px", "schedulers": [], "proxy_port": free_port(),
                              "source_retries": 1}
    values.update(overrides)
    async with trio.open_nursery() as nursery:
        peer: Peer = await nursery.start(serve, PeerConfig(**values))
        try:
            yield peer, f"http://127.0.0.1:{peer.proxy_port}"
        finally:
            nursery.cancel_scope.cancel()


async def push_blob(registry: RegistryServer, repo: str, data: bytes) -> str:
    async with registry.client() as client:
        digest: str = await client.push_blob(repo, data)
        return digest


def mirror(registry: RegistryServer, **headers: str) -> dict[str, str]:
    return {"X-Dragonfly-Registry": registry.url, **headers}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- pure helpers -------------------------------------------------------------------------------------------


def test_range_parsing() -> None:
    assert parse_range("bytes=0-99") == ByteRange(0, 99)
    assert parse_range("bytes=100-") == ByteRange(100, None)
    assert parse_range("bytes=-5") == ByteRange(None, 5)
    assert parse_range(None) is None
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=-", "bytes=a-b"):
        assert parse_range(ignored) is None, ignored
    assert ByteRange(0, 99).resolve(50) == (0, 49)
    assert ByteRange(None, 5).resolve(50) == (45, 49)
    assert ByteRange(None, 500).resolve(50) == (0, 49)
    assert ByteRange(10, None).resolve(50) == (10, 49)
    for unsatisfiable, length in ((ByteRange(50, None), 50), (ByteRange(None, 0), 50), (ByteRange(0, 0), 0)):
        with pytest.raises(Unsatisfiable):
            unsatisfiable.resolve(length)


def test_hop_by_hop_headers_are_dropped() -> None:
    headers = [("connection", "keep-alive, x-secret"), ("x-secret", "1"), ("keep-alive", "5"),
               ("transfer-encoding", "chunked"), ("authorization", "Bearer t"), ("accept", "*/*")]
    assert end_to_end(headers) == [("authorization", "Bearer t"), ("accept", "*/*")]


# --- in-process peer with its proxy, no scheduler -----------------------------------------------------------


async def test_blobs_go_p2p_with_ranges_and_the_rest_passes_through(registry: RegistryServer, short_dir: Path
                                                                    ) -> None:
    digest = await push_blob(registry, "lazyfs/big", BLOB)
    async with registry.client() as client:
        image = await push_test_image(client, "lazyfs/app", "1", [b"x" * 1024])
    async with proxy_peer(short_dir) as (peer, proxy), httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        url = f"/v2/lazyfs/big/blobs/{digest}"
        whole = await http.get(url, headers=mirror(registry))
        assert whole.status_code == 200, whole.text
        assert whole.content == BLOB
        assert whole.headers["docker-content-digest"] == digest
        assert whole.headers["content-type"] == "application/octet-stream"
        task_id = whole.headers["x-dragonfly-task-id"]
        assert peer.storage.task(task_id) is not None and peer.storage.task(task_id).state == "succeeded"  # type: ignore[union-attr]

        served = registry.bytes_served(digest)
        for header, first, last in (("bytes=5000000-9000000", 5000000, 9000000), ("bytes=-100", len(BLOB) - 100,
                                    len(BLOB) - 1), ("bytes=10000000-", 10000000, len(BLOB) - 1)):
            part = await http.get(url, headers=mirror(registry, Range=header))
            assert part.status_code == 206, part.text
            assert part.content == BLOB[first : last + 1]
            assert part.headers["content-range"] == f"bytes {first}-{last}/{len(BLOB)}"
        assert registry.bytes_served(digest) == served  # served from the peer's store, after a HEAD each
        refused = await http.get(url, headers=mirror(registry, Range=f"bytes={len(BLOB)}-"))
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{len(BLOB)}"

        manifest_url = "/v2/lazyfs/app/manifests/1"
        accept = {"Accept": OCI_MANIFEST}
        direct = httpx.get(f"{registry.url}{manifest_url}", headers=accept)
        for method in ("GET", "HEAD"):
            through = await http.request(method, manifest_url, headers=mirror(registry, **accept))
            assert through.status_code == 200
            assert "x-dragonfly-task-id" not in through.headers
            for name in ("content-type", "docker-content-digest", "content-length", "etag"):
                assert through.headers[name] == direct.headers[name], name
            assert through.content == (direct.content if method == "GET" else b"")
        assert (await http.get("/v2/", headers=mirror(registry))).status_code == 200

        missing = "sha256:" + "0" * 64
        answer = await http.get(f"/v2/lazyfs/big/blobs/{missing}", headers=mirror(registry))
        assert answer.status_code == 404 and answer.headers["x-dragonfly-error-type"] == "backend"
        assert answer.json()["errors"][0]["code"] == "NOT_FOUND"
        # a HEAD of a blob is not P2P: passed through
        head = await http.head(f"/v2/lazyfs/app/blobs/{image.layers[0].digest}", headers=mirror(registry))
        assert head.status_code == 200 and "x-dragonfly-task-id" not in head.headers


async def test_concurrent_clients_share_one_download(registry: RegistryServer, short_dir: Path) -> None:
    digest = await push_blob(registry, "lazyfs/shared", BLOB)
    results: dict[int, bytes] = {}
    async with proxy_peer(short_dir) as (_, proxy), httpx.AsyncClient(base_url=proxy, timeout=60) as http:

        async def get(index: int, extra: dict[str, str]) -> None:
            answer = await http.get(f"/v2/lazyfs/shared/blobs/{digest}", headers=mirror(registry, **extra))
            assert answer.status_code in (200, 206), answer.text
            results[index] = answer.content

        async with trio.open_nursery() as nursery:
            for index, extra in enumerate([{}, {}, {"Range": "bytes=4194000-4194999"}]):
                nursery.start_soon(get, index, extra)
    assert results == {0: BLOB, 1: BLOB, 2: BLOB[4194000:4195000]}
    assert registry.bytes_served(digest) == len(BLOB)  # one copy from the origin


async def test_upstream_from_containerd_ns_param_and_forward_proxy_mode(registry: RegistryServer,
                                                                        short_dir: Path) -> None:
    digest = await push_blob(registry, "lazyfs/ns", BLOB[: 3 * MiB])
    async with proxy_peer(short_dir, proxy_plain_http=["127.0.0.1"]) as (_, proxy):
        async with httpx.AsyncClient(base_url=proxy, timeout=60) as http:
            answer = await http.get(f"/v2/lazyfs/ns/blobs/{digest}", params={"ns": registry.host})
            assert answer.status_code == 200 and answer.content == BLOB[: 3 * MiB]
            assert "x-dragonfly-task-id" in answer.headers
        async with httpx.AsyncClient(proxy=proxy, timeout=60) as http:  # absolute-form requests
            answer = await http.get(f"{registry.url}/v2/lazyfs/ns/blobs/{digest}")
            assert answer.status_code == 200 and answer.content == BLOB[: 3 * MiB]
            assert "x-dragonfly-task-id" in answer.headers
            ping = await http.get(f"{registry.url}/v2/")
            assert ping.status_code == 200 and "x-dragonfly-task-id" not in ping.headers
            # a push goes through unchanged: POST, then PUT with a streamed body
            data = os.urandom(2 * MiB)
            started = await http.post(f"{registry.url}/v2/lazyfs/pushed/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = httpx.URL(registry.url).join(started.headers["location"])
            pushed_digest = "sha256:" + hashlib.sha256(data).hexdigest()

            async def body() -> AsyncIterator[bytes]:
                for offset in range(0, len(data), 256 << 10):
                    yield data[offset : offset + (256 << 10)]

            done = await http.put(location.copy_merge_params({"digest": pushed_digest}), content=body(),
                                  headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
    assert httpx.get(f"{registry.url}/v2/lazyfs/pushed/blobs/{pushed_digest}").content == data


async def test_connect_is_a_blind_tunnel(registry: RegistryServer, short_dir: Path) -> None:
    async with proxy_peer(short_dir) as (_, proxy):
        port = int(proxy.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"CONNECT {registry.host} HTTP/1.1\r\nHost: {registry.host}\r\n\r\n".encode())
            head = await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 200 "), head
            await stream.send_all(f"GET /v2/ HTTP/1.1\r\nHost: {registry.host}\r\nConnection: close\r\n\r\n"
                                  .encode())
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 OK"), reply


async def test_bad_requests_do_not_hurt_the_daemon(registry: RegistryServer, short_dir: Path) -> None:
    digest = await push_blob(registry, "lazyfs/bad", BLOB[:MiB])
    async with proxy_peer(short_dir) as (_, proxy):
        port = int(proxy.rsplit(":", 1)[1])
        for garbage in (b"\x00\x01 nonsense\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * (100 << 10)):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(garbage)
                with trio.fail_after(10):
                    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 4")
        async with httpx.AsyncClient(base_url=proxy, timeout=60) as http:
            bad = await http.get(f"/v2/lazyfs/bad/blobs/{digest}", headers=mirror(registry, **{
                "X-Dragonfly-Piece-Length": "1024"}))
            assert bad.status_code == 400 and bad.headers["x-dragonfly-error-type"] == "proxy"
            down = await http.get("/v2/", headers={"X-Dragonfly-Registry": f"http://127.0.0.1:{free_port()}"})
            assert down.status_code == 502 and down.headers["x-dragonfly-error-type"] == "proxy"
            good = await http.get(f"/v2/lazyfs/bad/blobs/{digest}", headers=mirror(registry))
            assert good.content == BLOB[:MiB]


async def test_corrupt_origin_blob_is_never_delivered_whole(registry: RegistryServer, short_dir: Path) -> None:
    digest = await push_blob(registry, "lazyfs/corrupt", BLOB)
    path = registry.blob_path(digest)
    path.write_bytes(BLOB[:-1] + bytes([BLOB[-1] ^ 1]))  # same length, wrong sha256
    async with proxy_peer(short_dir) as (peer, proxy), httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        received = bytearray()
        with pytest.raises(httpx.HTTPError):  # the response is cut short before its last piece
            async with http.stream("GET", f"/v2/lazyfs/corrupt/blobs/{digest}", headers=mirror(registry)) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    received += chunk
        assert 0 < len(received) <= len(BLOB) - (len(BLOB) % (4 * MiB))  # streamed, but not the last piece
        assert peer.storage.tasks() == []  # the mismatching task was dropped


async def test_htpasswd_registry_with_and_without_credentials(auth_registry: RegistryServer, short_dir: Path
                                                              ) -> None:
    digest = await push_blob(auth_registry, "lazyfs/private", BLOB[: 5 * MiB])
    url = f"/v2/lazyfs/private/blobs/{digest}"
    async with proxy_peer(short_dir) as (_, proxy), httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        anonymous = await http.get(url, headers=mirror(auth_registry))
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].lower().startswith("basic")
        assert anonymous.headers["x-dragonfly-error-type"] == "backend"
        wrong = await http.get(url, headers=mirror(auth_registry, Authorization=basic(USERNAME, "nope")))
        assert wrong.status_code == 401

        allowed = await http.get(url, headers=mirror(auth_registry, Authorization=basic(USERNAME, PASSWORD)))
        assert allowed.status_code == 200 and allowed.content == BLOB[: 5 * MiB]
        # now cached locally: still refused without credentials (each client's own access check)
        again = await http.get(url, headers=mirror(auth_registry))
        assert again.status_code == 401
        ranged = await http.get(url, headers=mirror(auth_registry, Range="bytes=0-9"))
        assert ranged.status_code == 401
        manifest = await http.get("/v2/lazyfs/private/manifests/none", headers=mirror(auth_registry))
        assert manifest.status_code == 401 and "www-authenticate" in manifest.headers  # passed through


async def test_first_pieces_reach_the_client_before_the_download_ends(short_dir: Path) -> None:
    content = BLOB[: 12 * MiB]
    last_piece = threading.Event()

    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if match is None:
            return 200, {"Content-Length": str(len(content)), "Accept-Ranges": "bytes"}, b""
        first, last = int(match[1]), int(match[2])
        if first >= 8 * MiB:
            last_piece.wait(30)
        return 206, {"Content-Range": f"bytes {first}-{last}/{len(content)}"}, content[first : last + 1]

    with local_http_server(scripted_handler(respond)) as origin:
        async with proxy_peer(short_dir) as (_, proxy), httpx.AsyncClient(proxy=proxy, timeout=60) as http:
            async with http.stream("GET", f"{origin}/file", headers={"X-Dragonfly-Use-P2P": "true"}) as answer:
                assert answer.status_code == 200 and "x-dragonfly-task-id" in answer.headers
                received = bytearray()
                async for chunk in answer.aiter_raw():
                    received += chunk
                    if len(received) >= 8 * MiB and not last_piece.is_set():
                        assert received == content[: len(received)]  # two pieces while the third is held
                        last_piece.set()
            assert received == content


# --- the setup command ----------------------------------------------------------------------------------------


def test_setup_containerd_mirror_writes_hosts_toml_and_config_path(tmp_path: Path) -> None:
    config, hosts = tmp_path / "config.toml", tmp_path / "certs.d"
    directory, text = hosts_toml("http://127.0.0.1:4001", "docker.io")
    assert directory == "docker.io"
    assert tomllib.loads(text) == {"server": "https://index.docker.io", "host": {"http://127.0.0.1:4001": {
        "capabilities": ["pull", "resolve"], "header": {"X-Dragonfly-Registry": "https://index.docker.io"}}}}
    assert hosts_toml("http://127.0.0.1:4001", "http://127.0.0.1:5000")[0] == "127.0.0.1:5000"

    def lazyfs(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", "setup", "containerd", "--config", str(config),
                               "--mirror", "http://127.0.0.1:4001", "--hosts-dir", str(hosts), *args],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "config_path" in lazyfs("--print") and not config.exists()
    assert lazyfs().startswith(f"updated {hosts / '_default' / 'hosts.toml'}")
    assert tomllib.loads((hosts / "_default" / "hosts.toml").read_text()) == {
        "host": {"http://127.0.0.1:4001": {"capabilities": ["pull", "resolve"]}}}
    assert tomllib.loads(config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["registry"] == {
        "config_path": str(hosts)}
    assert lazyfs().count("unchanged") == 2
    if (default := subprocess.run(["containerd", "config", "default"], capture_output=True, text=True)).returncode == 0:
        config.write_text(default.stdout)
        lazyfs("--registry", "127.0.0.1:5000")
        assert tomllib.loads(config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["registry"][
            "config_path"] == str(hosts)
        assert (hosts / "127.0.0.1:5000" / "hosts.toml").exists()


# --- acceptance: two containerds, each pulling through its own peer -------------------------------------------


def _containerd(workdir: Path) -> Containerd:
    workdir.mkdir()
    config = workdir / "snapshotter.toml"
    config.write_text(f'[lazyfs]\nmode = "fuse"\ncache_dir = "{workdir / "cache"}"\nplain_http = ["127.0.0.1"]\n')
    snapshotter = SnapshotterProcess(workdir / "snapshotter-root", workdir / "snapshotter.sock",
                                     workdir / "snapshotter.log", config=config, run_dir=workdir / "run")
    return Containerd(workdir, snapshotter)


@pytest.mark.root
def test_second_containerd_pull_through_the_swarm_costs_the_registry_no_blob_bytes(
        registry: RegistryServer, private_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed")
    image = trio.run(_push_busybox, registry)
    runtimes = [_containerd(private_dir / name) for name in ("a", "b")]
    with swarm(private_dir / "swarm") as group, contextlib.ExitStack() as stack:
        scheduler = group.scheduler()
        group.peer("seed", [scheduler], seed=True)
        peers = [group.peer(f"peer-{name}", [scheduler], "--proxy-port", str(free_port())) for name in ("a", "b")]
        for runtime, peer in zip(runtimes, peers, strict=True):
            runtime.snapshotter.start()
            stack.callback(runtime.snapshotter.stop)
            runtime.start()
            stack.callback(runtime.stop)
            port = re.search(r"peer ready .* proxy_port=(\d+)", peer.log_text())[1]  # type: ignore[index]
            directory, text = hosts_toml(f"http://127.0.0.1:{port}", registry.url)
            (runtime.workdir / "certs.d" / directory).mkdir(parents=True)
            (runtime.workdir / "certs.d" / directory / "hosts.toml").write_text(text)

        served = []
        for runtime, peer in zip(runtimes, peers, strict=True):
            before = registry.bytes_served()
            runtime.ctr("image", "pull", "--hosts-dir", str(runtime.workdir / "certs.d"), "--snapshotter",
                        SNAPSHOTTER, image.reference, timeout=120)
            served.append(registry.bytes_served() - before)
            metrics = peer.metrics()
            assert metrics["lazyfs_peer_proxy_p2p_requests_total"] == len(image.blobs), peer.log_text()[-3000:]
            assert metrics["lazyfs_peer_proxy_errors_total"] == 0
            assert metrics["lazyfs_peer_source_bytes_total"] == 0  # the seed went to the registry, not the peer
        assert served[0] >= sum(len(blob) for blob in image.blobs.values())  # the seed's one copy
        assert served[1] == 0, served  # the second pull: every blob from the swarm

        for runtime, name in zip(runtimes, ("run-a", "run-b"), strict=True):
            try:
                run = runtime.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, image.reference, name, "/bin/sh",
                                  "-c", "echo hi; /bin/cat /etc/msg", timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"ctr run hung\n{log_tail(runtime.log_path)}") from None
            assert run.stdout == "hi\nupper\n"


async def _push_busybox(registry: RegistryServer) -> PushedImage:
    async with registry.client() as client:
        return await push_test_image(client, "lazyfs/busybox", "1", busybox_layers())


@pytest.mark.root
def test_containerd_pulls_from_an_htpasswd_registry_through_the_mirror(auth_registry: RegistryServer,
                                                                       containerd: Containerd) -> None:
    image = trio.run(_push_busybox, auth_registry)
    with swarm(containerd.workdir / "swarm") as group:  # one peer, no scheduler: it goes back to source itself
        peer = group.peer("peer", [], "--proxy-port", str(free_port()))
        port = re.search(r"peer ready .* proxy_port=(\d+)", peer.log_text())[1]  # type: ignore[index]
        directory, text = hosts_toml(f"http://127.0.0.1:{port}", auth_registry.url)
        hosts = containerd.workdir / "certs.d"
        (hosts / directory).mkdir(parents=True)
        (hosts / directory / "hosts.toml").write_text(text)
        pull = ["image", "pull", "--hosts-dir", str(hosts), "--snapshotter", SNAPSHOTTER, image.reference]

        refused = containerd.ctr(*pull, check=False, timeout=120)
        assert refused.returncode != 0
        assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower(), refused.stderr
        before = auth_registry.bytes_served()
        containerd.ctr(*pull[:2], "--user", f"{USERNAME}:{PASSWORD}", *pull[2:], timeout=120)
        metrics = peer.metrics()
        assert metrics["lazyfs_peer_proxy_p2p_requests_total"] == len(image.blobs)
        assert metrics["lazyfs_peer_source_bytes_total"] == sum(len(b) for b in image.blobs.values())
        assert auth_registry.bytes_served() - before == metrics["lazyfs_peer_source_bytes_total"]
    run = containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, image.reference, "auth-run", "/bin/sh", "-c",
                         "echo hi; /bin/cat /etc/msg", timeout=30)
    assert run.stdout == "hi\nupper\n"
