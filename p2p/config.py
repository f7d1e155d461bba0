"""Peer daemon settings: defaults as Dragonfly's dfdaemon, a TOML file, then command-line overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from socket import gethostname
from typing import Any

from p2p.taskid import host_id

DAY = 86400.0


@dataclass
class PeerConfig:
    """Everything a peer (or seed peer) daemon needs; bandwidths are bytes/s, 0 = unlimited."""

    data_dir: Path = Path("/var/lib/lazyfs/peer")
    socket: Path = Path("/run/lazyfs/peer.sock")  # dfdaemon.v2.DfdaemonDownload, for `lazyfs get`
    seed: bool = False
    schedulers: list[str] = field(default_factory=list)  # host:port of every scheduler
    ip: str = "127.0.0.1"  # the address other peers reach this one at
    hostname: str = field(default_factory=gethostname)
    listen: str = "0.0.0.0"
    grpc_port: int = 4000  # dfdaemon.v2.DfdaemonUpload
    vortex_port: int = 4005
    metrics_port: int = 4002  # Prometheus text on /metrics; 0 = off
    idc: str = ""
    location: str = ""
    upload_limit: int = 0
    download_limit: int = 0
    back_to_source_limit: int = 0
    max_uploads: int = 200
    concurrent_pieces: int = 8
    piece_timeout: float = 30.0
    source_timeout: float = 30.0  # one origin request, each of source_retries attempts
    source_retries: int = 4
    schedule_timeout: float = 120.0  # waiting for one scheduler answer
    max_schedule_count: int = 5
    back_to_source_fallback: bool = True  # go to the origin when no scheduler can help
    announce_interval: float = 300.0
    gc_interval: float = 900.0
    task_ttl: float = 30 * DAY
    disk_high_percent: float = 80.0
    disk_low_percent: float = 60.0
    disk_capacity: int | None = None  # bytes of content to count against, instead of the filesystem
    max_tx_bandwidth: int = 0  # announced, bits/s; 0 = derived from upload_limit, else 10 Gbit/s
    # Registry mirror / HTTP proxy (p2p/proxy.py). Off by default (0); Dragonfly's dfdaemon uses 4001, and
    # `lazyfs setup containerd --mirror` assumes http://127.0.0.1:4001. It is an open forward proxy, so it
    # listens on loopback unless proxy_listen says otherwise.
    proxy_port: int = 0
    proxy_listen: str = "127.0.0.1"
    registry_mirror: str = "https://index.docker.io"  # upstream without X-Dragonfly-Registry or ?ns=
    proxy_rules: list[str] = field(default_factory=lambda: [r"blobs/sha256.*"])  # GETs matching go P2P
    proxy_plain_http: list[str] = field(default_factory=list)  # ?ns= hosts reached over http, not https
    registry_mirror_blob_digest_task_id: bool = False  # task id = blob digest (enable_task_id_based_blob_digest)
    proxy_timeout: float = 300.0  # idle limit on a proxy connection, and on each upstream read
    # HTTPS interception (p2p/tls.py): CONNECT targets (``host:port``) matching one of proxy_intercept_hosts are
    # answered with a leaf certificate signed by this CA (PEM certificate and unencrypted PEM key); others stay
    # blind tunnels.
    proxy_ca_cert: Path | None = None
    proxy_ca_key: Path | None = None
    proxy_intercept_hosts: list[str] = field(default_factory=list)  # regexes searched in host:port
    origin_ca_bundle: Path | None = None  # PEM CA certificates trusted for HTTPS origins, besides the system's

    @property
    def host_id(self) -> str:
        """``{ip}-{hostname}``, with ``-seed`` on seed peers."""
        return host_id(self.ip, self.hostname, seed=self.seed)

    @property
    def announced_tx_bandwidth(self) -> int:
        """The upload capacity announced to schedulers, in bits/s."""
        if self.max_tx_bandwidth:
            return self.max_tx_bandwidth
        return self.upload_limit * 8 if self.upload_limit else 10_000_000_000

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> PeerConfig:
        """Defaults, then the TOML file's keys, then the non-None *overrides*."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(tomllib.loads(path.read_text()))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown peer settings: {', '.join(unknown)}")
        for key in ("data_dir", "socket", "proxy_ca_cert", "proxy_ca_key", "origin_ca_bundle"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)
