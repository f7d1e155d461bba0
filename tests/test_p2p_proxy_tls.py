"""HTTPS interception in the peer's proxy (p2p/proxy.py, p2p/tls.py) against a docker-registry serving TLS with a
certificate from a test-only origin CA; the proxy's own CA is another test CA. Clients are httpx and raw TLS
streams: what certificate they see, what bytes they get, and whether blobs went P2P.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from lazyfs.registry.auth import Credentials
from lazyfs.registry.manifest import OCI_MANIFEST
from p2p.config import PeerConfig
from p2p.tls import CertificateAuthority, Interceptor, TLSConfigError, check, origin_context
from tests.certs import TestCA, make_ca
from tests.containerd_fixtures import Containerd
from tests.registry_fixtures import (
    PASSWORD,
    USERNAME,
    PushedImage,
    RegistryServer,
    Response,
    free_port,
    htpasswd_auth,
    local_http_server,
    push_test_image,
    run_registry,
    scripted_handler,
)
from tests.swarm import lazyfs_command, swarm
from tests.test_p2p_proxy import proxy_peer

MiB = 1 << 20
BLOB = os.urandom(6 * MiB + 777)  # two 4 MiB pieces
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()}


@dataclass(frozen=True)
class Pki:
    """The proxy's CA, and the origin CA that signed the registry's certificate."""

    proxy: TestCA
    origin: TestCA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(make_ca(tmp_path / "pki", "proxy-ca"), make_ca(tmp_path / "pki", "origin-ca", rsa_key=True))


@pytest.fixture
def tls_registry(tmp_path: Path, pki: Pki) -> Iterator[RegistryServer]:
    """An htpasswd registry serving HTTPS on 127.0.0.1 with a certificate from the origin CA."""
    workdir = tmp_path / "tls-registry"
    with run_registry(workdir, htpasswd_auth(workdir), Credentials(USERNAME, PASSWORD),
                      tls=pki.origin.issue(workdir / "tls", ["127.0.0.1"]), ca_file=pki.origin.cert_path) as server:
        yield server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for peer sockets."""
    path = Path(tempfile.mkdtemp(prefix="lztls", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def intercepting(pki: Pki, *hosts: str) -> list[str]:
    """``lazyfs peer`` options intercepting *hosts* with the proxy CA, trusting the origin CA."""
    options = ["--proxy-port", str(free_port()), "--proxy-ca-cert", str(pki.proxy.cert_path), "--proxy-ca-key",
               str(pki.proxy.key_path), "--origin-ca-bundle", str(pki.origin.cert_path)]
    return options + [a for host in hosts for a in ("--proxy-intercept-host", host)]


def exact(host: str) -> str:
    return f"^{re.escape(host)}$"


async def connect(proxy_port: int, target: str) -> trio.SocketStream:
    """A stream through the proxy's CONNECT tunnel to *target*."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return stream


async def tls_through(proxy_port: int, target: str, trust: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream to *target* through the proxy, handshake done (certificate checked for 127.0.0.1)."""
    tls = trio.SSLStream(await connect(proxy_port, target), trust, server_hostname="127.0.0.1", https_compatible=True)
    with trio.fail_after(20):
        await tls.do_handshake()
    return tls


def blocking_handshake(proxy_port: int, target: str, trust: ssl.SSLContext) -> Exception | None:
    """A TLS handshake through the proxy by a blocking socket (which sends its alert when it fails); its error."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        try:
            trust.wrap_socket(sock, server_hostname="127.0.0.1").close()
        except ssl.SSLError as exc:
            return exc
    return None


async def pipelined_handshake(proxy_port: int, target: str, trust: ssl.SSLContext) -> x509.Certificate:
    """A TLS handshake whose ClientHello is sent together with the CONNECT request; the certificate it got."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = trust.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    async with await trio.open_tcp_stream("127.0.0.1", proxy_port) as stream:
        await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + outgoing.read())
        received = b""
        with trio.fail_after(20):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            incoming.write(rest)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await stream.send_all(outgoing.read())
                    incoming.write(await stream.receive_some(65536))
            await stream.send_all(outgoing.read())  # the client's Finished
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (up to 10 s) for *condition* to hold."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.02)


def peer_certificate(tls: trio.SSLStream[trio.SocketStream]) -> x509.Certificate:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(20):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


# --- configuration --------------------------------------------------------------------------------------------


def test_bad_ca_settings_are_refused_naming_the_file(tmp_path: Path, pki: Pki) -> None:
    other = make_ca(tmp_path / "other", "other-ca")
    not_a_ca = make_ca(tmp_path / "leafy", "leafy", ca=False)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    for cert, key, message in ((missing, pki.proxy.key_path, f"proxy CA certificate {missing}: No such file"),
                               (pki.proxy.cert_path, missing, f"proxy CA key {missing}: No such file"),
                               (garbage, pki.proxy.key_path, f"{garbage} is not a PEM certificate"),
                               (pki.proxy.cert_path, garbage, f"proxy CA key {garbage} is not"),
                               (pki.proxy.cert_path, other.key_path,
                                f"key {other.key_path} does not match the certificate {pki.proxy.cert_path}"),
                               (not_a_ca.cert_path, not_a_ca.key_path, "is not a CA certificate")):
        with pytest.raises(TLSConfigError, match=re.escape(message)):
            CertificateAuthority.load(cert, key)

    def config(**values: object) -> PeerConfig:
        return PeerConfig(proxy_port=4001, **values)  # type: ignore[arg-type]

    ca = {"proxy_ca_cert": pki.proxy.cert_path, "proxy_ca_key": pki.proxy.key_path}
    for values, message in (({"proxy_intercept_hosts": ["x"]}, "needs proxy_ca_cert"),
                            ({"proxy_ca_cert": pki.proxy.cert_path, "proxy_intercept_hosts": ["x"]},
                             "proxy_ca_key is missing"),
                            (ca, "nothing would be intercepted"),
                            ({**ca, "proxy_intercept_hosts": ["("]}, "bad regex '('"),
                            ({"origin_ca_bundle": garbage}, f"origin CA bundle {garbage}"),
                            ({"origin_ca_bundle": missing}, f"origin CA bundle {missing}: No such file")):
        with pytest.raises(TLSConfigError, match=re.escape(message)):
            check(config(**values))
    check(config(**ca, proxy_intercept_hosts=["x"], origin_ca_bundle=pki.origin.cert_path))
    check(PeerConfig(proxy_intercept_hosts=["("]))  # no proxy: nothing to check but the origin bundle
    toml = tmp_path / "peer.toml"
    toml.write_text(f'proxy_port = 4001\nproxy_ca_cert = "{pki.proxy.cert_path}"\n'
                    f'proxy_ca_key = "{pki.proxy.key_path}"\norigin_ca_bundle = "{pki.origin.cert_path}"\n'
                    "proxy_intercept_hosts = ['^registry\\.test:443$']\n")
    loaded = PeerConfig.load(toml, proxy_ca_key=str(other.key_path))
    assert (loaded.proxy_ca_cert, loaded.origin_ca_bundle) == (pki.proxy.cert_path, pki.origin.cert_path)
    assert loaded.proxy_intercept_hosts == [r"^registry\.test:443$"]
    with pytest.raises(TLSConfigError, match="does not match"):  # the flag's key overrides the file's
        check(loaded)
    check(PeerConfig.load(toml))

    # the CLI says so in one line, before starting anything
    peer = subprocess.run(lazyfs_command("peer", "--data-dir", str(tmp_path / "data"), "--proxy-port", "4001",
                                         "--proxy-ca-cert", str(pki.proxy.cert_path), "--proxy-ca-key",
                                         str(other.key_path), "--proxy-intercept-host", "."),
                          capture_output=True, text=True, timeout=60)
    assert peer.returncode == 1
    assert peer.stderr.strip() == (f"lazyfs peer: proxy CA key {other.key_path} does not match the certificate "
                                   f"{pki.proxy.cert_path}")
    assert not (tmp_path / "data").exists()


async def test_leaf_certificates_are_minted_per_host_and_cached(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "rsa-ca", rsa_key=True)
    interceptor = Interceptor(CertificateAuthority.load(ca.cert_path, ca.key_path), [r"^registry\.test:443$"])
    assert interceptor.intercepts("registry.test:443")
    assert not interceptor.intercepts("registry.test:5000") and not interceptor.intercepts("other.test:443")
    assert await interceptor.context("registry.test") is await interceptor.context("registry.test")
    assert await interceptor.context("127.0.0.1") is not await interceptor.context("registry.test")
    now = datetime.datetime.now(datetime.UTC)
    for host, name in (("registry.test", x509.DNSName("registry.test")),
                       ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
                       ("::1", x509.IPAddress(ipaddress.ip_address("::1")))):
        pem, expires = interceptor.ca.issue(host)
        leaf, chain_ca = x509.load_pem_x509_certificates(pem)
        assert chain_ca == ca.cert
        leaf.verify_directly_issued_by(ca.cert)
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
            x509.SubjectAlternativeName([name])
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        public = leaf.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        assert leaf.not_valid_after_utc == expires
        assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc <= now + datetime.timedelta(days=1,
                                                                                                        minutes=1)


async def test_a_ca_expiring_while_the_proxy_runs_is_refused_clearly(tmp_path: Path, short_dir: Path) -> None:
    ca = make_ca(tmp_path, "brief-ca", lifetime=datetime.timedelta(seconds=2))
    async with proxy_peer(short_dir, proxy_ca_cert=ca.cert_path, proxy_ca_key=ca.key_path,
                          proxy_intercept_hosts=["."]) as (peer, proxy):
        port = int(proxy.rsplit(":", 1)[1])
        remaining = ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        await trio.sleep(max(0.0, remaining.total_seconds()) + 0.5)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n")
            reply = await receive_all(stream)
        assert reply.startswith(b"HTTP/1.1 500 "), reply
        assert b"cannot intercept registry.test: proxy CA certificate CN=brief-ca expired at" in reply, reply
        assert peer.proxy is not None and peer.proxy.counters["proxy_errors"] == 1
    with pytest.raises(TLSConfigError, match=re.escape(f"proxy CA certificate {ca.cert_path} expired at")):
        CertificateAuthority.load(ca.cert_path, ca.key_path)


# --- against the TLS registry -----------------------------------------------------------------------------------


def test_intercepted_blobs_go_p2p_and_the_rest_passes_through(tls_registry: RegistryServer, pki: Pki,
                                                              short_dir: Path) -> None:
    image = trio.run(_push, tls_registry)
    blob_url = f"{tls_registry.url}/v2/lazyfs/tls/blobs/{DIGEST}"
    host = tls_registry.host
    with swarm(short_dir / "swarm") as group:
        scheduler = group.scheduler()
        group.peer("seed", [scheduler], "--origin-ca-bundle", str(pki.origin.cert_path), seed=True)
        peers = [group.peer(name, [scheduler], *intercepting(pki, exact(host))) for name in ("peer-a", "peer-b")]
        proxies = [f"http://127.0.0.1:{_proxy_port(peer.log_text())}" for peer in peers]

        with httpx.Client(proxy=proxies[0], verify=pki.proxy.trust(), timeout=120) as client:
            refused = client.get(blob_url)  # no credentials: the registry's answer, through the tunnel
            assert refused.status_code == 401 and refused.headers["x-dragonfly-error-type"] == "backend"
            assert refused.headers["www-authenticate"].lower().startswith("basic")
            blob = client.get(blob_url, headers=AUTH)
            assert blob.status_code == 200, blob.text
            assert blob.content == BLOB and blob.headers["docker-content-digest"] == DIGEST
            task_id = blob.headers["x-dragonfly-task-id"]
            ranged = client.get(blob_url, headers={**AUTH, "Range": "bytes=100-199"})
            assert ranged.status_code == 206 and ranged.content == BLOB[100:200]
            manifest_url = f"{tls_registry.url}/v2/lazyfs/app/manifests/1"
            accept = {**AUTH, "Accept": OCI_MANIFEST}
            manifest = client.get(manifest_url, headers=accept)
            direct = httpx.get(manifest_url, headers=accept, verify=pki.origin.trust())
            assert manifest.status_code == 200 and manifest.content == direct.content
            assert manifest.headers["docker-content-digest"] == image
            assert "x-dragonfly-task-id" not in manifest.headers
        metrics = peers[0].metrics()
        assert metrics["lazyfs_peer_proxy_intercepted_tunnels_total"] == 1  # keep-alive: one tunnel for all
        assert metrics["lazyfs_peer_proxy_p2p_requests_total"] == 3
        assert metrics["lazyfs_peer_proxy_direct_requests_total"] == 1
        assert metrics["lazyfs_peer_proxy_tls_handshake_errors_total"] == 0
        assert metrics["lazyfs_peer_source_bytes_total"] == 0  # the seed went to the registry
        tasks = json.loads(subprocess.run(lazyfs_command("tasks", "--json", "--socket", str(peers[0].socket)),
                                          capture_output=True, text=True, check=True, timeout=60).stdout)
        assert [(t["task_id"], t["url"], t["state"]) for t in tasks] == [(task_id, blob_url, "Succeeded")]

        before = tls_registry.bytes_served(DIGEST)
        with httpx.Client(proxy=proxies[1], verify=pki.proxy.trust(), timeout=120) as client:
            again = client.get(blob_url, headers=AUTH)
            assert again.status_code == 200 and again.content == BLOB
            assert again.headers["x-dragonfly-task-id"] == task_id
        assert tls_registry.bytes_served(DIGEST) == before  # peer-b: every byte from the swarm
        assert peers[1].metrics()["lazyfs_peer_source_bytes_total"] == 0


async def _push(registry: RegistryServer) -> str:
    async with registry.client() as client:
        assert await client.push_blob("lazyfs/tls", BLOB) == DIGEST
        image = await push_test_image(client, "lazyfs/app", "1", [b"layer" * 100])
        return image.manifest.digest


def _proxy_port(log: str) -> int:
    match = re.search(r"peer ready .* proxy_port=(\d+)", log)
    assert match is not None, log
    return int(match[1])


async def test_other_hosts_stay_blind_and_bad_clients_do_not_hurt(tls_registry: RegistryServer, pki: Pki,
                                                                 short_dir: Path, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    other_cert = pki.origin.issue(short_dir / "other", ["127.0.0.1"])
    hello: Response = (200, {"Content-Type": "text/plain"}, b"hello from the origin\n")
    with local_http_server(scripted_handler(lambda _: hello), tls=other_cert) as other:
        other_host = other.removeprefix("https://")
        async with proxy_peer(short_dir, proxy_ca_cert=pki.proxy.cert_path, proxy_ca_key=pki.proxy.key_path,
                              proxy_intercept_hosts=[exact(tls_registry.host)],
                              origin_ca_bundle=pki.origin.cert_path) as (peer, proxy):
            assert peer.proxy is not None
            counters = peer.proxy.counters
            port = int(proxy.rsplit(":", 1)[1])
            # not listed: a blind tunnel, the client sees the origin's own certificate
            async with await tls_through(port, other_host, pki.origin.trust()) as tls:
                assert peer_certificate(tls) == x509.load_pem_x509_certificate(other_cert.cert_path.read_bytes())
                await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (await receive_all(tls)).endswith(hello[2])
            assert counters["proxy_tunnels"] == 1 and counters["proxy_intercepted_tunnels"] == 0

            # listed: the proxy's certificate for the host, signed by its CA
            async with await tls_through(port, tls_registry.host, pki.proxy.trust()) as tls:
                leaf = peer_certificate(tls)
                assert leaf.issuer == pki.proxy.cert.subject
                assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                    x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
                await tls.send_all(b"\x00\x01 nonsense\r\n\r\n")  # garbage inside the tunnel
                assert (await receive_all(tls)).startswith(b"HTTP/1.1 400 ")
            assert counters["proxy_intercepted_tunnels"] == 1
            pipelined = await pipelined_handshake(port, tls_registry.host, pki.proxy.trust())
            assert pipelined.issuer == pki.proxy.cert.subject
            assert pipelined == leaf  # the cached leaf
            await until(lambda: counters["proxy_intercepted_tunnels"] == 2)

            # a client that does not trust the proxy's CA fails its handshake (and tells the proxy why)
            refused = await trio.to_thread.run_sync(blocking_handshake, port, tls_registry.host, pki.origin.trust())
            assert isinstance(refused, ssl.SSLCertVerificationError), refused
            # and one that speaks plain HTTP in the tunnel
            async with await connect(port, tls_registry.host) as stream:
                await stream.send_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                await receive_all(stream)
            await until(lambda: counters["proxy_tls_handshake_errors"] == 2)
            failures = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
            assert len(failures) == 2, failures
            assert all(f"host={tls_registry.host}" in line for line in failures)
            assert any("UNKNOWN_CA" in line.upper() or "unknown ca" in line for line in failures), failures

            # the proxy still serves, over the same kind of tunnel
            async with httpx.AsyncClient(proxy=proxy, verify=pki.proxy.trust(), timeout=60) as client:
                ping = await client.get(f"{tls_registry.url}/v2/", headers=AUTH)
                assert ping.status_code == 200
            assert counters["proxy_intercepted_tunnels"] == 3


async def test_an_origin_with_an_untrusted_certificate_gets_502(pki: Pki, short_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    untrusted = make_ca(short_dir / "rogue", "rogue-ca").issue(short_dir / "rogue", ["127.0.0.1"])
    caplog.set_level(logging.INFO, "lazyfs.proxy")
    seen: list[str] = []

    def respond(request: object) -> Response:
        seen.append("request")
        return 200, {}, b"must not be read"

    with local_http_server(scripted_handler(respond), tls=untrusted) as origin:
        async with proxy_peer(short_dir, proxy_ca_cert=pki.proxy.cert_path, proxy_ca_key=pki.proxy.key_path,
                              proxy_intercept_hosts=["."], origin_ca_bundle=pki.origin.cert_path,
                              source_retries=3) as (_, proxy), \
                httpx.AsyncClient(proxy=proxy, verify=pki.proxy.trust(), timeout=60) as client:
            for path in (f"/v2/lazyfs/x/blobs/{DIGEST}", "/v2/lazyfs/x/manifests/1"):
                answer = await client.get(origin + path)
                assert answer.status_code == 502, answer.text
                assert "CERTIFICATE_VERIFY_FAILED" in answer.text, answer.text
        assert seen == []
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("proxy refused")]
    assert len(refusals) == 2 and all("CERTIFICATE_VERIFY_FAILED" in line for line in refusals), refusals
    assert not [r for r in caplog.records if "origin retry" in r.getMessage()]  # an untrusted origin stays untrusted


def test_origin_context_adds_the_bundle_to_the_system_store(pki: Pki) -> None:
    system = len(origin_context(None).get_ca_certs())
    assert len(origin_context(pki.origin.cert_path).get_ca_certs()) == system + 1



# --- a Go client: ctr through HTTPS_PROXY -------------------------------------------------------------------------


def global_ipv4() -> str | None:
    """This machine's first global IPv4 address (Go clients never proxy requests to loopback addresses)."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    match = re.search(r"\binet (\d+\.\d+\.\d+\.\d+)/", shown.stdout)
    return match[1] if match else None


@pytest.mark.root
def test_ctr_fetches_an_image_through_the_intercepting_proxy(tmp_path: Path, pki: Pki, containerd: Containerd,
                                                             short_dir: Path) -> None:
    address = global_ipv4()
    if address is None:
        pytest.skip("no global IPv4 address to serve the registry on")
    workdir = tmp_path / "registry"
    with run_registry(workdir, htpasswd_auth(workdir), Credentials(USERNAME, PASSWORD), address=address,
                      tls=pki.origin.issue(workdir / "tls", [address]), ca_file=pki.origin.cert_path) as registry, \
            swarm(short_dir / "swarm") as group:
        image = trio.run(_push_image, registry)
        scheduler = group.scheduler()
        group.peer("seed", [scheduler], "--origin-ca-bundle", str(pki.origin.cert_path), seed=True)
        peer = group.peer("peer", [scheduler], *intercepting(pki, exact(registry.host)))
        env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
        env["HTTPS_PROXY"] = f"http://127.0.0.1:{_proxy_port(peer.log_text())}"
        containerd.ctr("content", "fetch", "--tlscacert", str(pki.proxy.cert_path), "--user",
                       f"{USERNAME}:{PASSWORD}", image.reference, env=env, timeout=120)
        listing = containerd.ctr("content", "ls", "-q").stdout.split()
        assert set(image.blobs) <= set(listing)
        metrics = peer.metrics()
        assert metrics["lazyfs_peer_proxy_intercepted_tunnels_total"] >= 1
        assert metrics["lazyfs_peer_proxy_tls_handshake_errors_total"] == 0
        assert metrics["lazyfs_peer_proxy_p2p_requests_total"] == len(image.blobs)  # the config and each layer
        assert metrics["lazyfs_peer_proxy_p2p_bytes_total"] == sum(len(blob) for blob in image.blobs.values())
        assert metrics["lazyfs_peer_proxy_errors_total"] == 0
        assert metrics["lazyfs_peer_source_bytes_total"] == 0  # the seed fetched them
        assert registry.bytes_served() >= sum(len(blob) for blob in image.blobs.values())


async def _push_image(registry: RegistryServer) -> PushedImage:
    async with registry.client() as client:
        return await push_test_image(client, "lazyfs/ctr", "1", [os.urandom(3 * MiB), b"small layer" * 100],
                                     compression="none")
