"""Real registries for tests: docker-registry processes (anonymous, htpasswd, token auth), a token service,
a tiny in-process HTTP server helper, and helpers to build and push small OCI / Docker images.

Fixtures: ``registry``, ``auth_registry``, ``token_registry`` (each a fresh registry with empty
storage), ``token_service`` and ``key_pair``. Helpers: :func:`make_layer_tar`, :func:`compress_layer`,
:func:`push_test_image`, :func:`local_http_server`, :func:`scripted_handler`, and
:meth:`RegistryServer.access_log` / :meth:`RegistryServer.bytes_served`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from lazyfs.registry.auth import Credentials
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_manifest,
)
from lazyfs.registry.transport import RetryPolicy

REGISTRY_BIN = shutil.which("docker-registry")
USERNAME, PASSWORD = "lazyfs", "s3cret-pw"
TOKEN_SERVICE, TOKEN_ISSUER = "lazyfs-test-registry", "lazyfs-test-issuer"
FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_delay=0.1)
_START_TIMEOUT = 15.0
# Apache combined format, as docker-registry writes its access log:
# 127.0.0.1 - user [03/Dec/2026:15:56:18 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]+\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


@dataclasses.dataclass(frozen=True)
class AccessLogEntry:
    """One request as logged by the registry."""

    method: str
    path: str
    status: int
    size: int


@dataclasses.dataclass
class RegistryServer:
    """A running docker-registry on 127.0.0.1 (plain HTTP, or HTTPS trusting *ca_file*) with its storage and log
    files."""

    host: str
    root: Path
    log_path: Path
    credentials: Credentials | None = None
    config_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting the registry's certificate (None for plain HTTP)."""
        return None if self.ca_file is None else ssl.create_default_context(cafile=self.ca_file)

    def urlopen(self, url: str, timeout: float) -> Any:
        """``urllib.request.urlopen`` trusting the registry's certificate."""
        return urllib.request.urlopen(url, timeout=timeout, context=self.ssl_context())

    def start(self) -> None:
        """Run docker-registry with this server's config; return once it answers."""
        assert self.config_path is not None and REGISTRY_BIN is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config_path)], stdout=log, stderr=log)
        _wait_until_up(self, self.process)

    def stop(self) -> None:
        """Stop the registry process (its storage stays)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Start the registry again on the same address and storage."""
        self.stop()
        self.start()

    def blob_path(self, digest: str) -> Path:
        """Where filesystem storage keeps a blob's bytes (for corrupting it in tests)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (https with TLS)."""
        return f"{'http' if self.ca_file is None else 'https'}://{self.host}"

    def client(self, **kwargs: Any) -> RegistryClient:
        """A client for this registry: plain HTTP or TLS, its credentials, fast retries, no Docker config."""
        options: dict[str, Any] = {
            "plain_http": self.ca_file is None,
            "verify": self.ssl_context() or True,
            "docker_config": False,
            "credentials": self.credentials,
            "retry": FAST_RETRY,
            "timeout": 10.0,
        }
        options.update(kwargs)
        return RegistryClient(self.host, **options)

    def access_log(self) -> list[AccessLogEntry]:
        """Every request logged so far, including all requests that completed before this call."""
        marker = uuid.uuid4().hex
        with contextlib.suppress(urllib.error.HTTPError):
            self.urlopen(f"{self.url}/v2/?lazyfs-log-mark={marker}", timeout=5).close()
        deadline = time.monotonic() + 5
        while marker not in (text := self.log_path.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise AssertionError(f"registry access log {self.log_path} never showed the marker request")
            time.sleep(0.01)
        entries = []
        for line in text.splitlines():
            match = _ACCESS_RE.match(line)
            if match and marker not in match.group(2):
                method, path, status, size = match.groups()
                entries.append(AccessLogEntry(method, path, int(status), 0 if size == "-" else int(size)))
        return entries

    def bytes_served(self, path_contains: str = "/blobs/", method: str = "GET") -> int:
        """Response bytes the registry sent for *method* requests whose path contains *path_contains*."""
        return sum(e.size for e in self.access_log() if e.method == method and path_contains in e.path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def run_registry(
    workdir: Path,
    auth: dict[str, Any] | None = None,
    credentials: Credentials | None = None,
    tls: KeyPair | None = None,
    ca_file: Path | None = None,
    address: str = "127.0.0.1",
) -> Iterator[RegistryServer]:
    """Start docker-registry on *address* with filesystem storage under *workdir* (serving HTTPS with *tls*, a
    certificate that *ca_file* trusts); stop it on exit, even on failure."""
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    host = f"{address}:{free_port()}"
    http: dict[str, Any] = {"addr": host, "secret": uuid.uuid4().hex}
    if tls:
        http["tls"] = {"certificate": str(tls.cert_path), "key": str(tls.key_path)}
    config = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True}},
        "http": http,
    }
    if auth:
        config["auth"] = auth
    config_path = workdir / "config.yml"
    config_path.write_text(json.dumps(config))  # JSON is valid YAML
    server = RegistryServer(host, workdir / "storage", workdir / "registry.log", credentials, config_path,
                            ca_file=ca_file)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _wait_until_up(server: RegistryServer, process: subprocess.Popen[bytes]) -> None:
    """Poll ``/v2/`` until the registry answers (any HTTP status), or fail with its log."""
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            server.urlopen(f"{server.url}/v2/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = server.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"docker-registry on {server.host} did not start:\n{log}")
        time.sleep(0.02)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """An anonymous registry with empty storage."""
    with run_registry(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A registry requiring HTTP basic auth (htpasswd) as USERNAME / PASSWORD; ``credentials`` holds them."""
    workdir = tmp_path / "auth-registry"
    with run_registry(workdir, htpasswd_auth(workdir), Credentials(USERNAME, PASSWORD)) as server:
        yield server


def htpasswd_auth(workdir: Path) -> dict[str, Any]:
    """The registry ``auth`` setting for USERNAME / PASSWORD, with its htpasswd file in *workdir*."""
    bcrypt = pytest.importorskip("bcrypt", reason="bcrypt (dev extra) makes the htpasswd file")
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USERNAME}:{hashed}\n")
    return {"htpasswd": {"realm": "lazyfs-test", "path": str(htpasswd)}}


# --- bearer tokens ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A key and its certificate (``key_pair``: RSA, self-signed for 127.0.0.1): signs tokens and serves TLS."""

    key_path: Path
    cert_path: Path

    def x5c(self) -> str:
        """The certificate as base64 DER, for the JWT ``x5c`` header."""
        pem = self.cert_path.read_text()
        return "".join(pem.split("-----")[2].split())

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        """An RS256 JWT carrying *claims*, signed with ``openssl dgst``."""
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="session")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A key and certificate made with the openssl CLI (skips the test if it is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI is not installed")
    workdir = tmp_path_factory.mktemp("token-keys")
    keys = KeyPair(workdir / "key.pem", workdir / "cert.pem")
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        [
            *command,
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(keys.key_path),
            "-out",
            str(keys.cert_path),
        ],
        capture_output=True,
        check=True,
    )
    return keys


@dataclasses.dataclass
class TokenService:
    """An in-process token service: grants every requested scope to USERNAME / PASSWORD, nothing to others.

    ``requests`` records ``(user or None, scopes)`` per token request; set ``token_field`` to
    ``"access_token"`` to answer in OAuth2 style.
    """

    keys: KeyPair
    url: str = ""
    token_field: str = "token"
    requests: list[tuple[str | None, list[str]]] = dataclasses.field(default_factory=list)

    def issue(self, query: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for a token request."""
        params = urllib.parse.parse_qs(query)
        scopes = params.get("scope", [])
        user = None
        if authorization:
            user, _, password = base64.b64decode(authorization.removeprefix("Basic ")).decode().partition(":")
            if (user, password) != (USERNAME, PASSWORD):
                return 401, {"details": "bad credentials"}
        self.requests.append((user, scopes))
        access = []
        for scope in scopes if user else []:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user or "",
            "aud": params.get("service", [""])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return 200, {self.token_field: self.keys.sign_jwt(claims), "expires_in": 300}


Response = tuple[int, dict[str, str], bytes]
"""Status, headers and body of a scripted HTTP response."""


def scripted_handler(
    respond: Callable[[http.server.BaseHTTPRequestHandler], Response],
) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler answering every GET, HEAD, POST, PUT and PATCH with ``respond(request)``.

    Request bodies are read (by Content-Length) and dropped; HEAD answers carry no body.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, headers, body = respond(self)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler], tls: KeyPair | None = None) -> Iterator[str]:
    """Serve *handler* on a free 127.0.0.1 port in a thread; yields ``http[s]://127.0.0.1:PORT``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_path, tls.key_path)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def token_service(key_pair: KeyPair) -> Iterator[TokenService]:
    """A running :class:`TokenService`; its realm is ``service.url + "/token"``."""
    service = TokenService(key_pair)

    def respond(request: http.server.BaseHTTPRequestHandler) -> Response:
        status, body = service.issue(urllib.parse.urlsplit(request.path).query, request.headers.get("Authorization"))
        return status, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with local_http_server(scripted_handler(respond)) as url:
        service.url = url
        yield service


@pytest.fixture
def token_registry(tmp_path: Path, token_service: TokenService) -> Iterator[RegistryServer]:
    """A registry using bearer-token auth from ``token_service``; ``credentials`` holds the login."""
    auth = {
        "token": {
            "realm": f"{token_service.url}/token",
            "service": TOKEN_SERVICE,
            "issuer": TOKEN_ISSUER,
            "rootcertbundle": str(token_service.keys.cert_path),
        }
    }
    with run_registry(tmp_path / "token-registry", auth, Credentials(USERNAME, PASSWORD)) as server:
        yield server


# --- test images ------------------------------------------------------------------------------------------


def make_layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed, deterministic layer tar holding regular *files* (parent dirs are implied)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def compress_layer(tar: bytes, compression: str) -> bytes:
    """*tar* compressed with ``gzip``, ``zstd`` or ``none``."""
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    assert compression == "none", compression
    return tar


@dataclasses.dataclass(frozen=True)
class PushedImage:
    """What :func:`push_test_image` stored."""

    reference: str
    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor]
    blobs: dict[str, bytes]


_LAYER_TYPES = {
    (OCI_MANIFEST, "gzip"): OCI_LAYER_GZIP,
    (OCI_MANIFEST, "zstd"): OCI_LAYER_ZSTD,
    (OCI_MANIFEST, "none"): OCI_LAYER,
    (DOCKER_MANIFEST, "gzip"): DOCKER_LAYER_GZIP,
}


async def push_test_image(
    client: RegistryClient,
    repo: str,
    tag: str | None,
    layers: Sequence[bytes],
    *,
    compression: str = "gzip",
    media_type: str = OCI_MANIFEST,
    platform: str = "linux/amd64",
) -> PushedImage:
    """Push an image made of the uncompressed layer *tars*; by digest only when *tag* is None.

    The returned manifest descriptor carries *platform*, ready for :func:`build_index`.
    """
    layer_type = _LAYER_TYPES[(media_type, compression)]
    target = Platform.parse(platform)
    blobs: dict[str, bytes] = {}
    descriptors = []
    for tar in layers:
        blob = compress_layer(tar, compression)
        digest = await client.push_blob(repo, blob)
        blobs[digest] = blob
        descriptors.append(Descriptor(layer_type, digest, len(blob)))
    config = {
        "architecture": target.architecture,
        "os": target.os,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]},
        "config": {},
    }
    if target.variant:
        config["variant"] = target.variant
    config_blob = json.dumps(config).encode()
    config_type = OCI_CONFIG if media_type == OCI_MANIFEST else DOCKER_CONFIG
    config_desc = Descriptor(config_type, await client.push_blob(repo, config_blob), len(config_blob))
    blobs[config_desc.digest] = config_blob
    manifest = build_manifest(config_desc, descriptors, media_type)
    digest = hashlib.sha256(manifest).hexdigest()
    reference = f"{client.registry}/{repo}:{tag}" if tag else f"{client.registry}/{repo}@sha256:{digest}"
    await client.put_manifest(reference, manifest, media_type)
    manifest_desc = Descriptor(media_type, f"sha256:{digest}", len(manifest), platform=target)
    return PushedImage(reference, manifest_desc, config_desc, descriptors, blobs)
