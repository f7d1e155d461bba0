"""A multi-host test bed on one machine: hosts are network namespaces joined by veth pairs to a Linux bridge,
each link tc-limited in both directions; plus an "origin" namespace for the registry. Shared by tests and bench.

Layout (all names start with ``lzh``, so a crashed run's leftovers are found and removed by prefix)::

    root namespace: bridge lzbr0 10.77.0.1/24, bridge ports lzh<i>b / lzhob
    origin          namespace lzh-origin, eth0 10.77.0.2/24
    host i          namespace lzh-<i>,    eth0 10.77.0.(10+i)/24

Each host's link is shaped with tbf on both ends of its veth: the namespace side's egress is the host's upload,
the bridge side's egress its download. The origin is shaped on its upload only by default (so pushing test data
into it is fast). Only one bed exists at a time: :class:`HostBed` holds an exclusive lock file for its lifetime,
which is what makes removing leftovers by prefix safe; a second bed waits for the lock.

Needs root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.registry_fixtures import REGISTRY_BIN, RegistryServer, _wait_until_up
from tests.swarm import PeerDaemon, Swarm

PREFIX = "lzh"  # every namespace (lzh-*) and root-side veth (lzh*b) the bed creates
BRIDGE = "lzbr0"
SUBNET = "10.77.0"
GATEWAY = f"{SUBNET}.1"
ORIGIN_ADDRESS = f"{SUBNET}.2"
LOCK_PATH = Path("/run/lock/lazyfs-hostbed.lock")
SCHEDULER_PORT = 8002
METRICS_PORT = 4002
REGISTRY_PORT = 5000
DEV = "eth0"  # the veth end inside every namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def tc_limit(prefix: Sequence[str], dev: str, rate_mbit: float) -> None:
    """Limit *dev*'s egress to *rate_mbit* (10^6 bit/s) with a token bucket; *prefix* runs tc in a namespace."""
    subprocess.run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                    "burst", "256kb", "latency", "50ms"], check=True)


def tc_unlimit(prefix: Sequence[str], dev: str) -> None:
    """Remove a limit set by :func:`tc_limit` (no error when there is none)."""
    subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False, capture_output=True)


@dataclasses.dataclass(frozen=True)
class Host:
    """One namespace on the bridge."""

    netns: str
    address: str
    bridge_veth: str  # its veth end in the root namespace (a bridge port)

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this host."""
        return ["ip", "netns", "exec", self.netns]

    def command(self, *argv: str) -> list[str]:
        """*argv* run inside this host."""
        return [*self.prefix, *argv]

    def run(self, *argv: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """Run *argv* inside this host and wait for it."""
        return subprocess.run(self.command(*argv), check=check, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start *argv* inside this host."""
        return subprocess.Popen(self.command(*argv), **kwargs)

    def limit(self, up_mbit: float | None, down_mbit: float | None) -> None:
        """Cap this host's upload and download (None = no cap in that direction)."""
        if up_mbit is None:
            tc_unlimit(self.prefix, DEV)
        else:
            tc_limit(self.prefix, DEV, up_mbit)
        if down_mbit is None:
            tc_unlimit([], self.bridge_veth)
        else:
            tc_limit([], self.bridge_veth, down_mbit)


def leftover_namespaces() -> list[str]:
    """Namespaces named like the bed's (``lzh-*``)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-")]


def leftover_links() -> list[str]:
    """Root-namespace links named like the bed's (its bridge and bridge-side veths)."""
    out = _ip("-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n == BRIDGE or (n.startswith(PREFIX) and n.endswith("b"))]


def remove_leftovers() -> None:
    """Delete every namespace, veth and bridge the bed may have created (a crashed run's, or this run's)."""
    for netns in leftover_namespaces():
        for pid in _ip("netns", "pids", netns, check=False).stdout.split():  # processes still inside
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", netns, check=False)  # takes the veth inside, and so its bridge-side peer
    for link in leftover_links():
        _ip("link", "del", link, check=False)


class HostBed:
    """*n* hosts plus an origin on a bridge; a context manager that tears everything down on exit."""

    def __init__(self, n: int, rate_mbit: float | None = 100, origin_mbit: float | None = 100,
                 origin_down_mbit: float | None = None, lock_wait: float = 1800.0) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"host count {n} out of range 1..200")
        self.n = n
        self.rate_mbit = rate_mbit
        self.origin_mbit = origin_mbit
        self.origin_down_mbit = origin_down_mbit
        self.lock_wait = lock_wait
        self.hosts = [Host(f"{PREFIX}-{i}", f"{SUBNET}.{10 + i}", f"{PREFIX}{i}b") for i in range(n)]
        self.origin = Host(f"{PREFIX}-origin", ORIGIN_ADDRESS, f"{PREFIX}ob")
        self._lock: IO[bytes] | None = None

    def __enter__(self) -> HostBed:
        self._acquire()
        try:
            remove_leftovers()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _acquire(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_PATH.open("a+b")
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise RuntimeError(f"another host bed holds {LOCK_PATH} (busy for {self.lock_wait} s)") from None
                time.sleep(0.5)
        self._lock = lock

    def _build(self) -> None:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in [self.origin, *self.hosts]:
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.bridge_veth, "type", "veth", "peer", "name", DEV, "netns", host.netns)
            _ip("link", "set", host.bridge_veth, "master", BRIDGE)
            _ip("link", "set", host.bridge_veth, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", DEV)
            _ip("-n", host.netns, "link", "set", DEV, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "route", "add", "default", "via", GATEWAY)
        self.origin.limit(self.origin_mbit, self.origin_down_mbit)
        for host in self.hosts:
            host.limit(self.rate_mbit, self.rate_mbit)

    def close(self) -> None:
        """Remove everything (idempotent) and release the lock."""
        if self._lock is None:
            return
        try:
            remove_leftovers()
        finally:
            self._lock.close()
            self._lock = None


@dataclasses.dataclass
class NetnsRegistry(RegistryServer):
    """docker-registry run inside a network namespace (``prefix`` = ``ip netns exec NS``)."""

    prefix: Sequence[str] = ()

    def start(self) -> None:
        """Run docker-registry in the namespace; return once it answers."""
        assert self.config_path is not None and REGISTRY_BIN is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*self.prefix, REGISTRY_BIN, "serve", str(self.config_path)],
                                            stdout=log, stderr=log)
        _wait_until_up(self, self.process)


@contextlib.contextmanager
def netns_registry(workdir: Path, host: Host, port: int = REGISTRY_PORT) -> Iterator[RegistryServer]:
    """An anonymous docker-registry (filesystem storage under *workdir*) on ``host.address:port``; stopped on exit."""
    if REGISTRY_BIN is None:
        raise RuntimeError("docker-registry is not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    addr = f"{host.address}:{port}"
    config = workdir / "config.yml"
    config.write_text(json.dumps({  # JSON is valid YAML
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": addr, "secret": uuid.uuid4().hex},
    }))
    server = NetnsRegistry(addr, workdir / "storage", workdir / "registry.log", None, config, prefix=host.prefix)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class HostSwarm(Swarm):
    """A :class:`Swarm` whose daemons run inside bed hosts, on the hosts' addresses."""

    def scheduler_on(self, host: Host, name: str = "scheduler", *extra: str, port: int = SCHEDULER_PORT) -> str:
        """Start a scheduler inside *host*; returns its ``address:port``."""
        return self.scheduler(name, *extra, port=port, address=host.address, prefix=host.prefix)

    def peer_on(self, host: Host, name: str, schedulers: Sequence[str], *extra: str, seed: bool = False,
                metrics_port: int = METRICS_PORT) -> PeerDaemon:
        """Start a peer (or seed peer) named *name* inside *host*; its metrics are reached at the host's address."""
        return self.peer(name, schedulers, *extra, seed=seed, address=host.address, prefix=host.prefix,
                         metrics_port=metrics_port)

    def get_on(self, host: Host, peer: PeerDaemon, url: str, output: Path, *extra: str) -> subprocess.Popen[bytes]:
        """Start ``lazyfs get`` through *peer*, inside *host*."""
        return self.get(peer, url, output, *extra, prefix=host.prefix)


_SEND = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = server.accept()
left, block = int(sys.argv[3]), bytes(1 << 20)
while left > 0:
    left -= conn.send(block[:min(left, len(block))])
conn.close()
"""
_RECEIVE = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
start, got = time.perf_counter(), 0
while data := conn.recv(1 << 20):
    got += len(data)
print(got, time.perf_counter() - start)
"""


def transfer_seconds(sender: Host | None, receiver: Host | None, nbytes: int, port: int = 7999) -> float:
    """Seconds to move *nbytes* over TCP from *sender* to *receiver* (None = the root namespace, on the bridge)."""
    address = sender.address if sender else GATEWAY
    send = subprocess.Popen([*(sender.prefix if sender else []), "python3", "-c", _SEND, address, str(port),
                             str(nbytes)], stdout=subprocess.PIPE)
    try:
        assert send.stdout is not None
        send.stdout.readline()  # listening
        out = subprocess.run([*(receiver.prefix if receiver else []), "python3", "-c", _RECEIVE, address,
                              str(port)], check=True, capture_output=True, text=True, timeout=600).stdout
        got, seconds = out.split()
        if int(got) != nbytes:
            raise RuntimeError(f"received {got} of {nbytes} bytes")
        return float(seconds)
    finally:
        send.kill()
        send.wait()


def tools_missing() -> str | None:
    """Why a host bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    return None
