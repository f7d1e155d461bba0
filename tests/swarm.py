"""A P2P swarm of real processes for tests and benchmarks: ``lazyfs scheduler`` and ``lazyfs peer`` daemons
on 127.0.0.1, each with its own data dir, socket and log; everything is killed on exit, even after failures."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

START_TIMEOUT = 20.0
_READY = {
    "scheduler": re.compile(r"scheduler_started .*?port=(\d+)"),
    "peer": re.compile(r"peer ready .*?grpc_port=(\d+) vortex_port=(\d+)"),
}


@dataclass
class Daemon:
    """One daemon process and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    ports: tuple[int, ...] = ()

    def log_text(self) -> str:
        """What the daemon logged so far."""
        return self.log.read_text(errors="replace")


@dataclass
class PeerDaemon(Daemon):
    """A peer daemon, with the paths a test needs."""

    socket: Path = Path()
    data_dir: Path = Path()
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"  # where /metrics is reached from the test process

    @property
    def grpc_port(self) -> int:
        """Its DfdaemonUpload port."""
        return self.ports[0]

    def metrics(self) -> dict[str, float]:
        """Its Prometheus samples, by metric name (labels dropped)."""
        text = httpx.get(f"http://{self.metrics_host}:{self.metrics_port}/metrics", timeout=5).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name.split("{")[0]] = float(value)
        return samples


def lazyfs_command(*args: str) -> list[str]:
    """The argv that runs ``lazyfs ARGS`` with this interpreter."""
    return [sys.executable, "-m", "lazyfs.cli", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Swarm:
    """Starts daemons under *root*; :meth:`close` stops them all."""

    root: Path
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def _start(self, name: str, kind: str, args: Sequence[str],
               prefix: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], Path, tuple[int, ...]]:
        """Run ``lazyfs ARGS`` (behind *prefix*, e.g. ``ip netns exec NS``) until its ready line is logged."""
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen([*prefix, *lazyfs_command(*args)], stdout=out, stderr=out,
                                       start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := _READY[kind].search(log.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        return process, log, tuple(int(g) for g in match.groups())

    def scheduler(self, name: str = "scheduler", *extra: str, port: int = 0, address: str = "127.0.0.1",
                  prefix: Sequence[str] = ()) -> str:
        """Start a scheduler (behind *prefix*, listening on *address*); returns its ``host:port``."""
        listen = f"{address}:{port or _free_port()}"
        process, log, ports = self._start(name, "scheduler", ["scheduler", "--listen", listen, *extra], prefix)
        self.daemons[name] = Daemon(name, process, log, ports)
        return listen

    def peer(self, name: str, schedulers: Sequence[str], *extra: str, seed: bool = False, address: str = "127.0.0.1",
             prefix: Sequence[str] = (), metrics_port: int | None = None) -> PeerDaemon:
        """Start a peer (or seed peer) named *name* (its host name too), behind *prefix*, on *address*."""
        data_dir = self.root / name
        socket_path = self.root / f"{name}.sock"
        metrics_port = metrics_port or _free_port()
        args = ["peer", "--hostname", name, "--data-dir", str(data_dir), "--socket", str(socket_path),
                "--ip", address, "--listen", address, "--grpc-port", "0", "--vortex-port", "0",
                "--metrics-port", str(metrics_port), *extra]
        args += [a for s in schedulers for a in ("--scheduler", s)]
        if seed:
            args.append("--seed")
        process, log, ports = self._start(name, "peer", args, prefix)
        daemon = PeerDaemon(name, process, log, ports, socket_path, data_dir, metrics_port, address)
        self.daemons[name] = daemon
        return daemon

    def get(self, peer: PeerDaemon, url: str, output: Path, *extra: str,
            prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start ``lazyfs get`` through *peer* (behind *prefix*)."""
        return subprocess.Popen([*prefix, *lazyfs_command("get", url, "-O", str(output), "--socket", str(peer.socket),
                                                          "-q", *extra)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a daemon and wait for it to go."""
        daemon = self.daemons[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.process.pid, sig)
        daemon.process.wait(timeout=20)

    def close(self) -> None:
        """Stop every daemon: SIGTERM, then SIGKILL after a grace period."""
        for daemon in self.daemons.values():
            if daemon.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for daemon in self.daemons.values():
            try:
                daemon.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.process.pid, signal.SIGKILL)
                daemon.process.wait()


S = TypeVar("S", bound=Swarm)


@contextlib.contextmanager
def swarm(root: Path, kind: type[S] = Swarm) -> Iterator[S]:  # type: ignore[assignment]
    """A swarm (of *kind*) rooted at *root*, torn down on exit."""
    root.mkdir(parents=True, exist_ok=True)
    group = kind(root)
    try:
        yield group
    finally:
        group.close()


def push_blob(registry_url: str, repository: str, data: bytes) -> str:
    """Upload *data* as a blob (monolithic upload); returns its ``sha256:`` digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=registry_url, timeout=120) as client:
        started = client.post(f"/v2/{repository}/blobs/uploads/")
        started.raise_for_status()
        location = httpx.URL(started.headers["location"]).copy_merge_params({"digest": digest})  # keeps _state
        done = client.put(location, content=data,
                          headers={"content-type": "application/octet-stream"})
        done.raise_for_status()
    return digest


def sha256_file(path: Path) -> str:
    """``sha256:`` digest of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
