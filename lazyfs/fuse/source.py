"""Where a mount's bootstrap and chunk data come from: a local bootstrap + blob dir, or a registry."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from lazyfs.chunks.backends import Backend, DirBackend, RegistryBackend
from lazyfs.errors import LazyfsError
from lazyfs.rafs.loader import read_bootstrap_bytes
from lazyfs.registry.auth import Credentials
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.redirects import RedirectCache
from lazyfs.registry.reference import ImageReference

DEFAULT_PEER_PROXY = "http://127.0.0.1:4001"
PEER_PROBE_TIMEOUT = 5.0
"""Seconds the check that the peer proxy listens may take at mount time."""


@dataclass(frozen=True)
class SourceSpec:
    """What to mount and how to reach its data."""

    source: str  # local bootstrap file, or a Nydus image reference
    backend: str = "registry"  # registry | dir | p2p
    image: str | None = None  # for a local bootstrap with the registry backend: the image its blobs are in
    blob_dir: Path | None = None
    plain_http: bool = False
    platform: str = "linux/amd64"
    username: str | None = None
    password: str | None = None
    peer_proxy: str = DEFAULT_PEER_PROXY  # for the p2p backend: the local lazyfs peer's registry mirror


@dataclass(frozen=True)
class ResolvedSource:
    """A local bootstrap file and the backend that serves its blobs."""

    bootstrap: Path
    backend: Backend


def _store_bootstrap(cache_dir: Path, data: bytes) -> Path:
    """Keep a bootstrap under the cache dir, named by its sha256, written atomically."""
    folder = cache_dir / "bootstraps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(data).hexdigest() + ".boot")
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


@asynccontextmanager
async def open_source(spec: SourceSpec, cache_dir: Path) -> AsyncIterator[ResolvedSource]:
    """Make the bootstrap local and open the backend (a registry client stays open meanwhile).

    The p2p backend is the registry backend with every registry request sent to the local lazyfs peer's
    registry mirror (blobs and their ranges come from the swarm, manifests pass through).
    """
    local = os.path.exists(spec.source)
    if local and spec.backend == "dir":
        if spec.blob_dir is None:
            raise LazyfsError("--backend dir needs --blob-dir")
        yield ResolvedSource(_store_bootstrap(cache_dir, read_bootstrap_bytes(spec.source)), DirBackend(spec.blob_dir))
        return
    if spec.backend not in ("registry", "p2p"):
        raise LazyfsError(f"backend {spec.backend} cannot serve {spec.source}")
    if local and spec.image is None:
        raise LazyfsError("a local bootstrap needs --blob-dir, or --image naming the registry image of its blobs")
    ref = ImageReference.parse(spec.image or spec.source)
    creds = Credentials(spec.username, spec.password or "") if spec.username else None
    mirror = await _check_peer_proxy(spec.peer_proxy) if spec.backend == "p2p" else None
    # a mount makes many Range reads per blob: remember where the registry redirects them
    async with RegistryClient(ref.registry, credentials=creds, plain_http=spec.plain_http,
                              redirects=RedirectCache(), mirror=mirror) as client:
        if local:
            boot = read_bootstrap_bytes(spec.source)
        else:
            boot = await _registry_bootstrap(client, spec)
        yield ResolvedSource(_store_bootstrap(cache_dir, boot), RegistryBackend(client, ref.repository))


async def _registry_bootstrap(client: RegistryClient, spec: SourceSpec) -> bytes:
    from lazyfs.convert.remote import fetch_bootstrap, fetch_nydus_manifest

    manifest = await fetch_nydus_manifest(client, spec.source, spec.platform)
    return await fetch_bootstrap(client, spec.source, manifest)


async def _check_peer_proxy(url: str) -> str:
    """*url* (``http://host:port``) once something listens there; a clear error otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise LazyfsError(f"--peer-proxy {url!r}: expected http://host:port")
    try:
        with trio.fail_after(PEER_PROBE_TIMEOUT):
            stream = await trio.open_tcp_stream(parts.hostname, port)
    except (OSError, trio.TooSlowError) as exc:
        reason = "no answer" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        raise LazyfsError(f"no lazyfs peer proxy at {url} ({reason}): start `lazyfs peer --proxy-port {port}` "
                          "or pass --peer-proxy") from None
    await stream.aclose()
    return url
