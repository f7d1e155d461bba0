"""Preheat (scheduler/preheat.py, ``lazyfs preheat``): issue 5, scope item 2.

Units: the blob URLs and task ids preheat produces equal those the peer's registry mirror (p2p/proxy.py)
computes for containerd's blob GETs (Dragonfly's DF#3674 pitfall); manifest URLs from references; request
validation; seed choice; concurrency, fan-out and failure listing against fake seeds; index/platform and
bearer-header resolution against a real registry. Then real processes (docker-registry, ``lazyfs scheduler``,
seed and normal peers from tests/swarm.py): after ``lazyfs preheat`` the seed holds every blob and a pull
through another peer, by ``lazyfs get`` and through its mirror proxy, costs the registry no blob bytes; errors
for a missing image, no seed peer, a corrupt layer, and htpasswd / token registries with and without a login.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio

from lazyfs.registry.errors import AuthError, NotFoundError
from lazyfs.registry.manifest import OCI_INDEX, OCI_MANIFEST, build_index
from p2p.api import HOST_TYPE_SEED, common, dfdaemon, dfdaemon_grpc, scheduler, scheduler_grpc, scheduler_stub
from p2p.config import PeerConfig
from p2p.download import download_task_id
from p2p.grpc_bridge import channel, serve
from p2p.proxy import Proxy
from p2p.taskid import task_id
from scheduler.config import SchedulerConfig
from scheduler.errors import ServiceError
from scheduler.preheat import (
    ALL_SEED_PEERS,
    METADATA_BYTES,
    METADATA_TASKS,
    Options,
    Preheater,
    blob_url,
    choose_seeds,
    manifest_url,
    parse_manifest_url,
    request_headers,
    resolve_image,
)
from scheduler.resources import Resources
from scheduler.seeding import SeedTrigger
from scheduler.service import SchedulerService
from snapshotter.mirror import registry_server
from tests.registry_fixtures import (
    PASSWORD,
    TOKEN_SERVICE,
    USERNAME,
    PushedImage,
    RegistryServer,
    TokenService,
    free_port,
    make_layer_tar,
    push_test_image,
)
from tests.swarm import PeerDaemon, lazyfs_command, swarm

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
REGISTRY = "http://127.0.0.1:5000"


def proxy_download(registry: str, path: str, **headers: str) -> common.Download:
    """The Download the peer's mirror builds for containerd's ``GET path`` with ``X-Dragonfly-Registry``."""
    proxy = Proxy(PeerConfig(proxy_plain_http=["127.0.0.1:5000"]), None, None)  # type: ignore[arg-type]
    sent = [("host", "127.0.0.1:4001"), ("x-dragonfly-registry", registry), ("user-agent", "containerd/2.0"),
            ("accept", "application/vnd.oci.image.layer.v1.tar+gzip, */*"),
            *((k.lower().replace("_", "-"), v) for k, v in headers.items())]
    url = proxy._upstream_url(path, sent, None)
    return proxy._download(url, sent)


def preheat_download(manifest: str, digest: str, **request: Any) -> common.Download:
    """The Download preheat sends a seed for *digest* of the image at manifest URL *manifest*."""
    target = parse_manifest_url(manifest)
    message = scheduler.PreheatImageRequest(url=manifest, **request)
    options = Options.from_request(message, request_headers(message.header, message.username, message.password))
    return options.download(target.blob_url(digest), digest)


# --- units ------------------------------------------------------------------------------------------------------


def test_preheat_task_ids_equal_the_mirror_proxys() -> None:
    proxied = proxy_download(REGISTRY, f"/v2/lazyfs/app/blobs/{DIGEST}", authorization="Bearer t0ken")
    preheated = preheat_download(f"{REGISTRY}/v2/lazyfs/app/manifests/1", DIGEST, username="u", password="p")
    assert preheated.url == proxied.url == f"{REGISTRY}/v2/lazyfs/app/blobs/{DIGEST}"
    assert download_task_id(preheated) == download_task_id(proxied) == task_id(proxied.url)
    assert preheated.digest == proxied.digest == DIGEST
    for name in ("tag", "application", "piece_length", "filtered_query_params", "content_for_calculating_task_id",
                 "enable_task_id_based_blob_digest"):
        assert getattr(preheated, name) == getattr(proxied, name), name
    assert preheated.need_back_to_source and preheated.priority == common.LEVEL0
    assert preheated.request_header["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_containerd_ns_query_and_by_digest_mode_still_match() -> None:
    # containerd appends ?ns=<registry> to mirror requests; ns is a default filtered query parameter
    proxied = proxy_download(REGISTRY, f"/v2/lazyfs/app/blobs/{DIGEST}?ns=127.0.0.1:5000")
    preheated = preheat_download(f"{REGISTRY}/v2/lazyfs/app/manifests/1", DIGEST)
    assert proxied.url != preheated.url
    assert download_task_id(proxied) == download_task_id(preheated)
    # with X-Dragonfly-Tag / -Piece-Length the ids change, and preheat must say the same to match
    tagged = proxy_download(REGISTRY, f"/v2/lazyfs/app/blobs/{DIGEST}", x_dragonfly_tag="t",
                            x_dragonfly_piece_length=str(8 * MiB))
    assert download_task_id(tagged) != download_task_id(preheated)
    assert download_task_id(tagged) == download_task_id(
        preheat_download(f"{REGISTRY}/v2/lazyfs/app/manifests/1", DIGEST, tag="t", piece_length=8 * MiB))
    by_digest = proxy_download(REGISTRY, f"/v2/lazyfs/app/blobs/{DIGEST}",
                               x_dragonfly_enable_task_id_based_blob_digest="true")
    assert download_task_id(by_digest) == DIGEST.removeprefix("sha256:") == download_task_id(
        preheat_download(f"{REGISTRY}/v2/lazyfs/app/manifests/1", DIGEST, enable_task_id_based_blob_digest=True))


@pytest.mark.parametrize(("ref", "plain_http", "url"), [
    ("127.0.0.1:5000/app:1", True, "http://127.0.0.1:5000/v2/app/manifests/1"),
    ("127.0.0.1:5000/team/app", True, "http://127.0.0.1:5000/v2/team/app/manifests/latest"),
    ("ghcr.io/owner/app:v2", False, "https://ghcr.io/v2/owner/app/manifests/v2"),
    (f"localhost:5000/app:1@{DIGEST}", False, f"https://localhost:5000/v2/app/manifests/{DIGEST}"),
    ("busybox", False, "https://index.docker.io/v2/library/busybox/manifests/latest"),
    ("docker.io/library/busybox:1.36", False, "https://index.docker.io/v2/library/busybox/manifests/1.36"),
])
def test_manifest_url_from_reference(ref: str, plain_http: bool, url: str) -> None:
    assert manifest_url(ref, plain_http) == url
    target = parse_manifest_url(url)
    assert target.plain_http == plain_http
    assert target.blob_url(DIGEST) == blob_url(url.split("/v2/")[0], target.repository, DIGEST)


def test_docker_hub_blob_urls_use_the_mirror_header_the_setup_writes() -> None:
    _, upstream = registry_server("docker.io")  # `lazyfs setup containerd --mirror` X-Dragonfly-Registry
    proxied = proxy_download(upstream, f"/v2/library/busybox/blobs/{DIGEST}")
    preheated = preheat_download(manifest_url("busybox"), DIGEST)
    assert download_task_id(proxied) == download_task_id(preheated)


@pytest.mark.parametrize("url", ["127.0.0.1:5000/app:1", "ftp://h/v2/a/manifests/1", "http://h/v2/a/blobs/x",
                                 "http://h/v2/UPPER/manifests/1", "http://h/v2/a/manifests/1?x=1"])
def test_bad_manifest_urls_are_invalid_arguments(url: str) -> None:
    with pytest.raises(ServiceError) as caught:
        parse_manifest_url(url)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("fields", "wanted"), [
    ({"scope": "all_peers"}, "not supported"), ({"scope": "some"}, "unknown"),
    ({"concurrent_task_count": 1000}, "concurrent_task_count"), ({"percentage": 0}, "percentage"),
])
def test_bad_options_are_invalid_arguments(fields: dict[str, Any], wanted: str) -> None:
    with pytest.raises(ServiceError, match=wanted) as caught:
        Options.from_request(scheduler.PreheatImageRequest(url="http://h/v2/a/manifests/1", **fields), {})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_request_headers() -> None:
    assert request_headers({"X-A": "1"}) == {"X-A": "1"}
    login = request_headers({"authorization": "Bearer x", "X-A": "1"}, "u", "p")
    assert login == {"X-A": "1", "Authorization": "Basic " + base64.b64encode(b"u:p").decode()}


def _resources(*seeds: str) -> Resources:
    resources = Resources()
    for n, name in enumerate(seeds):
        resources.announce_host(common.Host(id=name, type=HOST_TYPE_SEED, ip=f"10.0.0.{n + 1}", port=4000), 0.0)
    resources.announce_host(common.Host(id="normal", type=0, ip="10.0.1.1", port=4000), 0.0)
    return resources


def test_seed_choice() -> None:
    resources = _resources("s1", "s2", "s3")
    trigger = SeedTrigger(resources, SchedulerConfig())
    single = Options({})
    for n in range(20):
        tid = task_id(f"{REGISTRY}/v2/a/blobs/sha256:{n:064x}")
        seed = trigger.pick(tid)
        assert seed is not None
        assert [s.host_id for s in choose_seeds(resources, tid, single)] == [seed.id]  # the seed a trigger picks
    assert [s.host_id for s in choose_seeds(resources, "x", Options({}, scope=ALL_SEED_PEERS))] == ["s1", "s2", "s3"]
    assert [s.address for s in choose_seeds(resources, "x", Options({}, scope=ALL_SEED_PEERS, ips=("10.0.0.2",)))
            ] == ["10.0.0.2:4000"]
    assert len(choose_seeds(resources, "x", Options({}, scope=ALL_SEED_PEERS, count=2))) == 2
    assert len(choose_seeds(resources, "x", Options({}, scope=ALL_SEED_PEERS, percentage=34))) == 2
    assert choose_seeds(_resources(), "x", single) == []


def test_no_seed_is_unavailable_before_the_registry_is_asked() -> None:
    preheater = Preheater(_resources(), SchedulerConfig())
    with pytest.raises(ServiceError, match="no seed peer") as caught:
        preheater.preheat_image(scheduler.PreheatImageRequest(url=f"http://127.0.0.1:{free_port()}/v2/a/manifests/1"))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


class Gauge:
    """Concurrent calls across every fake seed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0


class FakeSeed(dfdaemon_grpc.DfdaemonUploadServicer):
    """A seed's DownloadTask that takes a while, counts concurrent calls and fails URLs containing "bad"."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.urls: list[str] = []

    def DownloadTask(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self.gauge.lock:
            self.gauge.running += 1
            self.gauge.most = max(self.gauge.most, self.gauge.running)
            self.urls.append(request.download.url)
        try:
            time.sleep(0.05)
            if "bad" in request.download.url:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "digest mismatch")
            yield dfdaemon.DownloadTaskResponse(download_task_started_response=dfdaemon.DownloadTaskStartedResponse(
                content_length=100))
        finally:
            with self.gauge.lock:
                self.gauge.running -= 1


@pytest.fixture
def fake_seeds() -> Iterator[tuple[Resources, list[FakeSeed]]]:
    resources, fakes, servers, gauge = Resources(), [], [], Gauge()
    for name in ("s1", "s2"):
        fake = FakeSeed(gauge)
        server, port = serve("127.0.0.1:0", lambda srv, f=fake: dfdaemon_grpc.add_DfdaemonUploadServicer_to_server(
            f, srv), workers=16)
        resources.announce_host(common.Host(id=name, type=HOST_TYPE_SEED, ip="127.0.0.1", port=port), 0.0)
        fakes.append(fake)
        servers.append(server)
    yield resources, fakes
    for server in servers:
        server.stop(0)


def test_concurrency_fan_out_and_failures(fake_seeds: tuple[Resources, list[FakeSeed]]) -> None:
    resources, fakes = fake_seeds
    preheater = Preheater(resources, SchedulerConfig())
    options = Options({}, scope=ALL_SEED_PEERS, concurrent_task_count=3)
    items = [(options.download(f"{REGISTRY}/v2/a/blobs/sha256:{n:064x}"), f"layer {n}") for n in range(8)]
    summary = preheater._run("image", items, options, time.monotonic())
    assert summary.tasks == 8 and summary.bytes == 800 and summary.seeds == {"s1", "s2"}
    assert all(len(f.urls) == 8 for f in fakes)
    assert fakes[0].gauge.most == 3  # concurrent_task_count downloads at once, no more
    items.append((options.download(f"{REGISTRY}/v2/bad/blobs/{DIGEST}"), f"layer {DIGEST}"))
    with pytest.raises(ServiceError) as caught:
        preheater._run("image", items, options, time.monotonic())
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.message.count(f"layer {DIGEST} on s") == 2 and "2 of 18 downloads failed" in \
        caught.value.message and "digest mismatch" in caught.value.message


def test_preheat_file_over_grpc(fake_seeds: tuple[Resources, list[FakeSeed]]) -> None:
    resources, fakes = fake_seeds
    service = SchedulerService(resources, SchedulerConfig())
    server, port = serve("127.0.0.1:0", lambda srv: scheduler_grpc.add_SchedulerServicer_to_server(service, srv),
                         workers=8)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            stub = scheduler_stub(chan)
            _, call = stub.PreheatFile.with_call(scheduler.PreheatFileRequest(url="http://origin/model.bin"),
                                                 timeout=30)
            metadata = dict(call.trailing_metadata())
            assert (metadata[METADATA_TASKS], metadata[METADATA_BYTES]) == ("1", "100")
            assert sum(f.urls.count("http://origin/model.bin") for f in fakes) == 1  # single_seed_peer
            with pytest.raises(grpc.RpcError) as caught:
                stub.PreheatFile(scheduler.PreheatFileRequest(url="http://origin/bad", scope="all_seed_peers"),
                                 timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as caught:
                stub.PreheatImage(scheduler.PreheatImageRequest(url="http://origin/x"), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)


async def test_resolve_image_picks_the_platform_from_an_index(registry: RegistryServer) -> None:
    async with registry.client() as client:
        amd = await push_test_image(client, "multi/app", None, [b"amd" * 100], compression="none")
        arm = await push_test_image(client, "multi/app", None, [b"arm" * 100], compression="none",
                                    platform="linux/arm64/v8")
        await client.put_manifest(f"{registry.host}/multi/app:1", build_index([amd.manifest, arm.manifest]),
                                  OCI_INDEX)
    target = parse_manifest_url(manifest_url(f"{registry.host}/multi/app:1", plain_http=True))
    for platform, image in (("linux/arm64", arm), ("linux/amd64", amd), ("", amd)):
        blobs = await resolve_image(target, {}, platform)
        assert [b.digest for b in blobs] == [image.config.digest, *(layer.digest for layer in image.layers)]
        assert blobs[1].url == f"{registry.url}/v2/multi/app/blobs/{image.layers[0].digest}"
    with pytest.raises(NotFoundError, match="no manifest for platform linux/s390x"):
        await resolve_image(target, {}, "linux/s390x")


# --- real processes ---------------------------------------------------------------------------------------------


def _layers(sizes: list[int]) -> list[bytes]:
    return [make_layer_tar({f"layer{n}/data.bin": os.urandom(size)}) for n, size in enumerate(sizes)]


def _push(registry: RegistryServer, repo: str, layers: list[bytes]) -> PushedImage:
    async def push() -> PushedImage:
        async with registry.client() as client:
            return await push_test_image(client, repo, "1", layers, compression="none", media_type=OCI_MANIFEST)
    return trio.run(push)


def _lazyfs(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_CONFIG": "/nonexistent-lazyfs-test"}  # no stored logins
    return subprocess.run(lazyfs_command(*args), capture_output=True, text=True, timeout=timeout, env=env)


def _tasks(peer: PeerDaemon) -> dict[str, dict[str, Any]]:
    listing = _lazyfs("tasks", "--socket", str(peer.socket), "--json", timeout=30)
    assert listing.returncode == 0, listing.stderr
    return {row["task_id"]: row for row in json.loads(listing.stdout)}


def _blob_urls(registry: RegistryServer, repo: str, image: PushedImage) -> dict[str, str]:
    """Each blob's URL as the mirror proxy builds it for containerd, by digest."""
    digests = [image.config.digest, *(layer.digest for layer in image.layers)]
    return {d: proxy_download(registry.url, f"/v2/{repo}/blobs/{d}").url for d in digests}


def _get(peer: PeerDaemon, url: str, out: Path, *extra: str) -> None:
    got = _lazyfs("get", url, "-O", str(out), "--socket", str(peer.socket), "-q", *extra)
    assert got.returncode == 0, got.stderr


def test_preheat_then_pulls_through_peers_cost_the_registry_no_blob_bytes(registry: RegistryServer,
                                                                           tmp_path: Path) -> None:
    repo = "preheat/app"
    image = _push(registry, repo, _layers([9 * MiB, 3 * MiB, 64 << 10]))
    urls = _blob_urls(registry, repo, image)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        seed = group.peer("seed", [sched], seed=True)
        proxy_port = free_port()
        peer = group.peer("peer", [sched], "--proxy-port", str(proxy_port))
        before = registry.bytes_served()
        dead = f"127.0.0.1:{free_port()}"  # an unreachable scheduler first: the next one is used
        done = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", dead, "--scheduler", sched)
        assert done.returncode == 0, done.stderr + group.daemons["scheduler"].log_text()[-3000:]
        total = sum(len(b) for b in image.blobs.values())
        assert f"preheated {image.reference}: 4 blobs" in done.stdout
        assert f"via {sched}" in done.stdout
        assert registry.bytes_served() - before == total  # each blob fetched once, by the seed
        held = _tasks(seed)
        for digest, url in urls.items():
            row = held[task_id(url)]
            assert row["url"] == url
            assert row["state"].lower() == "succeeded" and row["pieces_held"] == row["piece_count"] >= 1, row
            assert row["content_length"] == len(image.blobs[digest])
        sched_log = group.daemons["scheduler"].log_text()
        assert "preheat_resolved" in sched_log and "preheat_done" in sched_log

        before = registry.bytes_served()
        first, *rest = image.layers
        _get(peer, urls[first.digest], tmp_path / "first")  # dfget-style
        assert (tmp_path / "first").read_bytes() == image.blobs[first.digest]
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}", timeout=120) as http:
            for layer in rest:  # containerd-style, through the mirror
                answer = http.get(f"/v2/{repo}/blobs/{layer.digest}", headers={"X-Dragonfly-Registry": registry.url})
                assert answer.status_code == 200, answer.text
                assert hashlib.sha256(answer.content).hexdigest() == layer.digest.removeprefix("sha256:")
        assert registry.bytes_served() - before == 0
        assert sched_log.count("seed_trigger") == group.daemons["scheduler"].log_text().count("seed_trigger")


def test_preheat_errors(registry: RegistryServer, tmp_path: Path) -> None:
    image = _push(registry, "preheat/small", _layers([1000]))
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        refused = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched)
        assert refused.returncode != 0
        assert "UNAVAILABLE" in refused.stderr and "no seed peer" in refused.stderr, refused.stderr

        seed = group.peer("seed", [sched], seed=True)
        missing = _lazyfs("preheat", f"{registry.host}/preheat/nothing:1", "--plain-http", "--scheduler", sched)
        assert missing.returncode != 0
        assert "NOT_FOUND" in missing.stderr and "preheat/nothing" in missing.stderr, missing.stderr
        platform = _lazyfs("preheat", image.reference, "--plain-http", "--platform", "linux/s390x",
                           "--scheduler", sched, "--timeout", "120")
        assert platform.returncode == 0  # a plain manifest has no platforms to choose from
        assert len(_tasks(seed)) == 2

    nobody = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", f"127.0.0.1:{free_port()}",
                     timeout=60)
    assert nobody.returncode != 0 and "no scheduler answered" in nobody.stderr, nobody.stderr


def test_preheat_from_an_htpasswd_registry(auth_registry: RegistryServer, tmp_path: Path) -> None:
    repo = "private/app"
    image = _push(auth_registry, repo, _layers([5 * MiB, 2000]))
    urls = _blob_urls(auth_registry, repo, image)
    login = "Authorization: Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        seed = group.peer("seed", [sched], seed=True)
        peer = group.peer("peer", [sched])
        anonymous = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched)
        assert anonymous.returncode != 0
        assert "UNAUTHENTICATED" in anonymous.stderr and "needs a login" in anonymous.stderr, anonymous.stderr
        wrong = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched,
                        "--username", USERNAME, "--password", "wrong")
        assert wrong.returncode != 0 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr
        assert _tasks(seed) == {}

        done = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched,
                       "--username", USERNAME, "--password", PASSWORD)
        assert done.returncode == 0, done.stderr
        assert set(_tasks(seed)) == {task_id(url) for url in urls.values()}
        before = auth_registry.bytes_served()
        layer = image.layers[0]
        _get(peer, urls[layer.digest], tmp_path / "layer", "-H", login)
        assert (tmp_path / "layer").read_bytes() == image.blobs[layer.digest]
        assert auth_registry.bytes_served() - before == 0
        stranger = group.peer("stranger", [sched])  # no local copy: its own stat must pass the registry's check
        denied = _lazyfs("get", urls[layer.digest], "-O", str(tmp_path / "denied"), "--socket",
                         str(stranger.socket), "-q")
        assert denied.returncode != 0 and "401" in denied.stderr, denied.stderr
        assert not (tmp_path / "denied").exists()



def test_all_seed_peers_and_a_corrupt_layer(registry: RegistryServer, tmp_path: Path) -> None:
    repo = "preheat/corrupt"
    image = _push(registry, repo, _layers([6 * MiB, 4000]))
    urls = _blob_urls(registry, repo, image)
    bad = image.layers[1].digest
    path = registry.blob_path(bad)
    path.write_bytes(bytes(len(path.read_bytes())))  # same size, wrong content
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        seeds = [group.peer(name, [sched], seed=True) for name in ("seed-a", "seed-b")]
        done = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched, "--scope", "all_seed_peers")
        assert done.returncode != 0
        assert "FAILED_PRECONDITION" in done.stderr and "2 of 6 downloads failed" in done.stderr, done.stderr
        assert done.stderr.count(f"layer {bad} on ") == 2, done.stderr
        good = {task_id(url) for digest, url in urls.items() if digest != bad}
        for seed in seeds:
            held = {tid for tid, row in _tasks(seed).items() if row["state"].lower() == "succeeded"}
            assert held == good


async def test_resolve_image_with_a_bearer_header(token_registry: RegistryServer, token_service: TokenService
                                                  ) -> None:
    async with token_registry.client() as client:
        image = await push_test_image(client, "tok/app", "1", [b"t" * 300], compression="none")
    target = parse_manifest_url(manifest_url(image.reference, plain_http=True))
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{token_service.url}/token", auth=(USERNAME, PASSWORD),
                                params={"service": TOKEN_SERVICE, "scope": "repository:tok/app:pull"})
    token = answer.json()["token"]
    blobs = await resolve_image(target, {"Authorization": f"Bearer {token}"}, "linux/amd64")
    assert [b.digest for b in blobs] == [image.config.digest, image.layers[0].digest]
    with pytest.raises(AuthError, match="401"):
        await resolve_image(target, {"Authorization": "Bearer nonsense"}, "linux/amd64")
    with pytest.raises(AuthError, match="needs a login"):
        await resolve_image(target, {}, "linux/amd64")


def test_preheat_from_a_token_registry(token_registry: RegistryServer, tmp_path: Path) -> None:
    repo = "tok/app"
    image = _push(token_registry, repo, _layers([5 * MiB]))
    urls = _blob_urls(token_registry, repo, image)
    with swarm(tmp_path / "swarm") as group:
        sched = group.scheduler()
        seed = group.peer("seed", [sched], seed=True)
        done = _lazyfs("preheat", image.reference, "--plain-http", "--scheduler", sched,
                       "--username", USERNAME, "--password", PASSWORD)
        assert done.returncode == 0, done.stderr
        assert set(_tasks(seed)) == {task_id(url) for url in urls.values()}
