"""Run the snapshotter: the snapshots API on a unix socket, served by grpcio's thread-pool server.

Settings come from the command line, else the TOML config file (top-level ``root`` and ``address``),
else the defaults. One server owns a root (``ROOT/lock``); SIGTERM or SIGINT stops it gracefully,
leaving snapshots and metadata in place for the next start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import stat
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc

from lazyfs.errors import LazyfsError
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.log import fields, log
from snapshotter.nydus import LazyOptions, NydusBackend
from snapshotter.overlay import Layout
from snapshotter.service import SnapshotService
from snapshotter.store import Store

DEFAULT_ADDRESS = Path("/run/lazyfs/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/lazyfs/snapshotter")
MAX_MESSAGE_BYTES = 16 << 20
"""containerd's gRPC message limit."""
STOP_GRACE_SECONDS = 10.0
WORKERS = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """Where the snapshotter keeps its state, where it listens, and how it mounts Nydus images."""

    root: Path = DEFAULT_ROOT
    address: Path = DEFAULT_ADDRESS
    lazy: LazyOptions = dataclasses.field(default_factory=LazyOptions)


def load_config(path: str | None, root: str | None = None, address: str | None = None) -> Config:
    """The config file at *path* (if any) with *root* and *address* overriding it.

    Settings: ``root``, ``address``, and in ``[lazyfs]``: ``mode`` (fuse | erofs), ``cache_dir``,
    ``plain_http`` (registries reached over HTTP, e.g. ``["127.0.0.1:5000"]``), ``backend`` (registry | p2p:
    mounts fetch through the local lazyfs peer) and ``peer_proxy`` (that peer's proxy, ``http://127.0.0.1:4001``).
    """
    values: dict[str, object] = {}
    if path is not None:
        with open(path, "rb") as file:
            try:
                values = tomllib.load(file)
            except tomllib.TOMLDecodeError as exc:
                raise LazyfsError(f"config {path}: {exc}") from None
        unknown = sorted(set(values) - {"root", "address", "lazyfs"})
        if unknown:
            raise LazyfsError(f"config {path}: unknown setting(s): {', '.join(unknown)}")
    overrides = {"root": root, "address": address}
    values.update({k: v for k, v in overrides.items() if v is not None})
    paths = {name: values.get(name) for name in ("root", "address") if name in values}
    for name, value in paths.items():
        if not isinstance(value, str) or not value:
            raise LazyfsError(f"config: {name} must be a non-empty path string")
    return Config(**{name: Path(str(value)) for name, value in paths.items()},
                  lazy=_lazy_options(values.get("lazyfs", {})))


def _lazy_options(section: object) -> LazyOptions:
    if not isinstance(section, dict) or set(section) - {"mode", "cache_dir", "plain_http", "backend", "peer_proxy"}:
        raise LazyfsError("config [lazyfs]: expected only mode, cache_dir, plain_http, backend and peer_proxy")
    mode = section.get("mode", "fuse")
    plain = section.get("plain_http", [])
    cache = section.get("cache_dir")
    if mode not in ("fuse", "erofs") or not isinstance(plain, list) or not all(isinstance(h, str) for h in plain):
        raise LazyfsError("config [lazyfs]: mode must be fuse or erofs, plain_http a list of registry hosts")
    if cache is not None and not isinstance(cache, str):
        raise LazyfsError("config [lazyfs]: cache_dir must be a path string")
    backend = section.get("backend", "registry")
    proxy = section.get("peer_proxy", LazyOptions.peer_proxy)
    if backend not in ("registry", "p2p") or not isinstance(proxy, str) or not proxy.startswith(("http://", "https://")):
        raise LazyfsError("config [lazyfs]: backend must be registry or p2p, peer_proxy an http:// URL")
    return LazyOptions(mode, Path(cache) if cache else None, tuple(plain), backend, proxy)


def build_service(root: Path, lazy: LazyOptions | None = None) -> SnapshotService:
    """The snapshots service for *root*: SQLite metadata, overlay layout, lazy Nydus backend (recovered)."""
    layout = Layout(root)
    layout.purge()
    store = Store(root / "metadata.db")
    backend = NydusBackend(layout, store, lazy or LazyOptions())
    backend.recover()
    return SnapshotService(store, layout, backend)


def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with _root_lock(config.root):
        _claim_socket(config.address)
        with _listening(config, build_service(config.root, config.lazy)) as server:
            stop.wait()
            log.info("%s", fields(event="stopping", grace=STOP_GRACE_SECONDS))
            server.stop(STOP_GRACE_SECONDS).wait()
    log.info("%s", fields(event="stopped"))


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Hold ``ROOT/lock`` exclusively: two snapshotters must never share a root."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LazyfsError(f"another snapshotter is using {root}") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _listening(config: Config, service: SnapshotService) -> Iterator[grpc.Server]:
    """A started gRPC server for *service* on the unix socket; the socket is removed afterwards."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(WORKERS, "snapshots"), options=options)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{config.address}")
    server.start()
    os.chmod(config.address, 0o660)
    log.info("%s", fields(event="serving", address=config.address, root=config.root, pid=os.getpid()))
    try:
        yield server
    finally:
        server.stop(0)
        service.store.close()
        with contextlib.suppress(FileNotFoundError):
            config.address.unlink()


def _claim_socket(address: Path) -> None:
    """Make way for the socket at *address*: fail if something listens there, remove a stale one."""
    address.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        mode = address.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LazyfsError(f"{address} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(address))
        except OSError:
            address.unlink()
            return
    raise LazyfsError(f"{address} is in use by a running server")
