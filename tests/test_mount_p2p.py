"""`lazyfs mount --backend p2p`: chunk reads through the local peer's registry mirror (issue 5, item 3).

Real processes: a docker-registry with a converted Nydus image, a scheduler, a seed peer and two peers A
and B with their proxies ("hosts" A and B: each its own peer, chunk cache and run dir). What host A read,
host B reads from the swarm: the registry serves no blob bytes for it. Faults: no peer proxy at mount time
fails the mount clearly; a peer killed mid-use turns reads into EIO within the read timeout.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from lazyfs.convert.converter import convert_image
from lazyfs.errors import LazyfsError
from lazyfs.fuse.source import SourceSpec, open_source
from lazyfs.rafs.loader import bootstrap_from_layer
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.manifest import OCI_MANIFEST
from snapshotter.server import load_config
from tests.mounts import Lazyfs
from tests.registry_fixtures import (
    FAST_RETRY,
    RegistryServer,
    Response,
    free_port,
    local_http_server,
    make_layer_tar,
    push_test_image,
    run_registry,
    scripted_handler,
)
from tests.swarm import PeerDaemon, Swarm, swarm

MiB = 1 << 20
READ = ["big/file-1.bin", "big/file-4.bin", "small/note-03.txt", "small/note-17.txt"]


# --- the registry client in mirror mode, against a scripted mirror (no processes) ------------------------------


def test_registry_client_through_a_mirror_names_the_registry_and_authenticates() -> None:
    blob = os.urandom(3000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    seen: list[dict[str, str]] = []
    tokens: list[str] = []

    def token(request: http.server.BaseHTTPRequestHandler) -> Response:
        tokens.append(request.path)
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": "t0k3n", "expires_in": 300}).encode()

    with local_http_server(scripted_handler(token)) as realm:

        def mirror(request: http.server.BaseHTTPRequestHandler) -> Response:
            seen.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})
            if request.headers.get("Authorization") != "Bearer t0k3n":
                challenge = f'Bearer realm="{realm}/token",service="registry.test"'
                return 401, {"WWW-Authenticate": challenge}, b"{}"
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
            assert match is not None
            first, last = int(match[1]), int(match[2])
            return 206, {"Content-Range": f"bytes {first}-{last}/{len(blob)}"}, blob[first : last + 1]

        async def main() -> bytes:
            client = RegistryClient("registry.test:5000", docker_config=False, plain_http=True, mirror=proxy,
                                    retry=FAST_RETRY)
            async with client, client.get_blob_stream("app", digest, offset=100, length=1000) as stream:
                return b"".join([piece async for piece in stream])

        with local_http_server(scripted_handler(mirror)) as proxy:
            assert trio.run(main) == blob[100:1100]
    assert [s["path"] for s in seen] == [f"/v2/app/blobs/{digest}"] * 2  # 401, then with the token
    assert {s["x-dragonfly-registry"] for s in seen} == {"http://registry.test:5000"}
    assert seen[1]["authorization"] == "Bearer t0k3n" and seen[1]["range"] == "bytes=100-1099"
    assert len(tokens) == 1 and "scope=repository%3Aapp%3Apull" in tokens[0]  # from the realm, not the mirror


def test_mirror_is_plain_http_but_the_registry_stays_https() -> None:
    def mirror(request: http.server.BaseHTTPRequestHandler) -> Response:
        assert request.headers["X-Dragonfly-Registry"] == "https://registry.test"
        return 200, {"Content-Type": OCI_MANIFEST}, b'{"schemaVersion": 2, "config": {}, "layers": []}'

    async def main(proxy: str) -> None:
        async with RegistryClient("registry.test", docker_config=False, mirror=proxy, retry=FAST_RETRY) as client:
            await client.ping()  # plain HTTP to the mirror is allowed without plain_http

    with local_http_server(scripted_handler(mirror)) as proxy:
        trio.run(main, proxy)


async def test_open_source_refuses_a_missing_peer_proxy(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    spec = SourceSpec("127.0.0.1:1/app:1", "p2p", plain_http=True, peer_proxy=nobody)
    with trio.fail_after(10), pytest.raises(LazyfsError, match=f"no lazyfs peer proxy at {nobody}"):
        async with open_source(spec, tmp_path):
            pass


def test_snapshotter_config_selects_the_p2p_backend(tmp_path: Path) -> None:
    config = tmp_path / "snapshotter.toml"
    config.write_text('[lazyfs]\nbackend = "p2p"\npeer_proxy = "http://127.0.0.1:4002"\n')
    lazy = load_config(str(config)).lazy
    assert (lazy.backend, lazy.peer_proxy) == ("p2p", "http://127.0.0.1:4002")
    assert load_config(None).lazy.backend == "registry"
    config.write_text('[lazyfs]\nbackend = "bittorrent"\n')
    with pytest.raises(LazyfsError, match="backend must be registry or p2p"):
        load_config(str(config))


# --- real mounts through a real swarm --------------------------------------------------------------------------


@dataclass
class Setup:
    """The registry with the image, and the swarm serving it."""

    registry: RegistryServer
    ref: str
    bootstrap: Path  # the image's bootstrap, as a local file
    files: dict[str, bytes]
    group: Swarm
    scheduler: str
    peers: dict[str, PeerDaemon]

    def proxy(self, peer: PeerDaemon) -> str:
        """``http://127.0.0.1:PORT`` of the peer's registry mirror."""
        port = re.search(r"peer ready .* proxy_port=(\d+)", peer.log_text())
        assert port is not None and port[1] != "0", peer.log_text()[-2000:]
        return f"http://127.0.0.1:{port[1]}"

    def blob_bytes(self) -> int:
        """Bytes of blob GETs the registry answered (its own access log; HEADs send no body)."""
        return self.registry.bytes_served("/blobs/")

    def blob_heads(self) -> int:
        """Blob HEAD requests the registry answered."""
        return sum(1 for e in self.registry.access_log() if e.method == "HEAD" and "/blobs/" in e.path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("FUSE mounts need root and /dev/fuse")
    work = tmp_path_factory.mktemp("p2p-mount")
    files = {f"big/file-{i}.bin": os.urandom(6 * MiB) for i in range(6)}  # ~36 MB: several 4 MiB pieces
    files |= {f"small/note-{i:02d}.txt": os.urandom(20_000) for i in range(30)}
    with run_registry(work / "registry") as registry:

        async def prepare() -> tuple[str, bytes]:
            async with registry.client() as client:
                pushed = await push_test_image(client, "p2p/src", "1", [make_layer_tar(files)], compression="none")
                target = f"{registry.host}/p2p/nydus:1"
                await convert_image(client, client, pushed.reference, target)
                manifest = await client.get_manifest(target)
                async with client.get_blob_stream("p2p/nydus", manifest.layers[-1].digest) as stream:
                    layer = b"".join([piece async for piece in stream])
                return target, bootstrap_from_layer(layer)

        ref, boot = trio.run(prepare)
        (work / "image.boot").write_bytes(boot)
        with swarm(work / "swarm") as group:
            scheduler = group.scheduler()
            peers = {"seed": group.peer("seed", [scheduler], seed=True)}
            for name in ("a", "b"):
                peers[name] = group.peer(f"peer-{name}", [scheduler], "--proxy-port", str(free_port()))
            yield Setup(registry, ref, work / "image.boot", files, group, scheduler, peers)


def host(root: Path, monkeypatch: pytest.MonkeyPatch) -> Lazyfs:
    """The CLI of one host: its own run dir and chunk cache."""
    cli = Lazyfs(root)
    monkeypatch.setenv("LAZYFS_RUN_DIR", cli.env["LAZYFS_RUN_DIR"])
    return cli


@pytest.mark.root
def test_host_b_reads_what_host_a_fetched_from_the_swarm(setup: Setup, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = setup.peers["a"], setup.peers["b"]
    start = setup.blob_bytes()
    host_a = host(tmp_path / "host-a", monkeypatch)
    with host_a.mount(setup.ref, tmp_path / "mnt-a", "--plain-http", "--backend", "p2p",
                      "--peer-proxy", setup.proxy(a)) as mnt:
        began = time.monotonic()
        for name in READ:
            assert (mnt / name).read_bytes() == setup.files[name], name
        took_a = time.monotonic() - began
        fetched_a = host_a.mount_status(mnt)["bytes_fetched"]
    served_a = setup.blob_bytes() - start
    wanted = sum(len(setup.files[name]) for name in READ)
    total = sum(len(data) for data in setup.files.values())
    assert wanted <= fetched_a < total  # lazily: the files read (and their merge window), not the image
    assert served_a > 0  # the seed went back to source for A
    metrics_a = a.metrics()
    assert metrics_a["lazyfs_peer_proxy_p2p_requests_total"] > 0 and metrics_a["lazyfs_peer_proxy_errors_total"] == 0

    before, heads = setup.blob_bytes(), setup.blob_heads()
    host_b = host(tmp_path / "host-b", monkeypatch)
    with host_b.mount(setup.ref, tmp_path / "mnt-b", "--plain-http", "--backend", "p2p",
                      "--peer-proxy", setup.proxy(b)) as mnt:
        began = time.monotonic()
        for name in READ:
            assert (mnt / name).read_bytes() == setup.files[name], name
        took_b = time.monotonic() - began
        status_b = host_b.mount_status(mnt)
    assert status_b["bytes_fetched"] >= wanted  # B's own cache was cold: every chunk came through peer B
    assert setup.blob_bytes() - before == 0  # ... and none of it from the registry (bootstrap included)
    heads_b = setup.blob_heads() - heads  # the peer's access check per request: no body bytes
    metrics_b = b.metrics()
    assert metrics_b["lazyfs_peer_source_bytes_total"] == 0 and metrics_b["lazyfs_peer_proxy_errors_total"] == 0
    print(f"host A: reads {took_a:.2f} s, fetched {fetched_a} B through its peer, registry served {served_a} B; "
          f"host B: reads {took_b:.2f} s, fetched {status_b['bytes_fetched']} B through its peer, registry served 0 B "
          f"({heads_b} blob HEADs)")


@pytest.mark.root
def test_mount_without_a_peer_proxy_fails_clearly(setup: Setup, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cli = host(tmp_path / "host", monkeypatch)
    (tmp_path / "mnt").mkdir()
    nobody = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    proc = cli("mount", setup.ref, str(tmp_path / "mnt"), "--plain-http", "--backend", "p2p", "--peer-proxy", nobody,
               "--cache-dir", str(cli.cache), check=False)
    assert proc.returncode != 0 and f"no lazyfs peer proxy at {nobody}" in proc.stderr, proc.stderr
    assert time.monotonic() - began < 30 and not os.path.ismount(tmp_path / "mnt")
    bad = cli("mount", setup.ref, str(tmp_path / "mnt"), "--backend", "p2p", "--peer-proxy", "ftp://x",
              "--cache-dir", str(cli.cache), check=False)
    assert bad.returncode != 0 and "expected http://host:port" in bad.stderr, bad.stderr


@pytest.mark.root
def test_peer_killed_mid_use_gives_eio_not_a_hang(setup: Setup, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = setup.group.peer("peer-doomed", [setup.scheduler], "--proxy-port", str(free_port()))
    cli = host(tmp_path / "host", monkeypatch)
    # as the snapshotter mounts: a local bootstrap, its blobs in the image (through the peer)
    with cli.mount(setup.bootstrap, tmp_path / "mnt", "--image", setup.ref, "--plain-http", "--backend", "p2p",
                   "--peer-proxy", setup.proxy(doomed), "--read-timeout", "3") as mnt:
        assert (mnt / "small/note-05.txt").read_bytes() == setup.files["small/note-05.txt"]
        setup.group.kill("peer-doomed")
        began = time.monotonic()
        with pytest.raises(OSError) as info:
            (mnt / "big/file-5.bin").read_bytes()
        took = time.monotonic() - began
        assert info.value.errno == errno.EIO and took < 15, took
        assert (mnt / "small/note-05.txt").read_bytes() == setup.files["small/note-05.txt"]  # cached: still fine
        print(f"EIO after {took:.2f} s with --read-timeout 3")
