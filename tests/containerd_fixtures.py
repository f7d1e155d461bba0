"""Real containerd and the lazyfs snapshotter for tests, each in a private directory, always torn down.

Fixtures:
- ``snapshotter``: a ``lazyfs snapshotter`` process (:class:`SnapshotterProcess`) on a private socket
  and root; ``client()`` gives a gRPC stub, ``restart()`` restarts it, ``log_path`` holds its log.
- ``containerd``: containerd (Debian's, 1.6) with a private root, state and sockets and a random
  namespace, registering that snapshotter as proxy plugin ``lazyfs`` (config written by
  ``snapshotter.setup``, so CRI's snapshotter is ``lazyfs`` with snapshot annotations on; no CNI).
  :meth:`Containerd.ctr` runs ``ctr -a SOCK -n NS ...``; CRI (on the same socket) uses namespace
  :data:`CRI_NAMESPACE`, whose tasks and containers teardown removes too.

Every run uses a fresh ``/tmp/lzct-*`` directory (short enough for unix socket paths) and random names,
so parallel runs do not collide. Teardown kills tasks, stops containerd and its shims, stops the
snapshotter, unmounts everything below the private directory and removes it, even after failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.overlay import mountpoints_under
from snapshotter.setup import configure_containerd

PROXY_NAME = "lazyfs"
CRI_NAMESPACE = "k8s.io"  # where containerd's CRI plugin keeps images and containers
REPO_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 20.0
_RUNC_STATE = Path("/run/containerd/runc")  # the runc v2 shim keeps container state in <this>/<namespace>
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], log_path: Path, what: str) -> None:
    """Return once *path* accepts connections; fail with the log tail if *process* dies or time runs out."""
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
            probe.connect(str(path))
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log_tail(log_path)}")
        time.sleep(0.02)


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file ("" if there is none)."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM *process*, SIGKILL it if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass
class SnapshotterProcess:
    """``lazyfs snapshotter`` serving *address* from *root*."""

    root: Path
    address: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    config: Path | None = None
    run_dir: Path | None = None  # LAZYFS_RUN_DIR of the lazyfs mounts it starts

    def start(self) -> None:
        """Start the server; return once its socket accepts connections."""
        command = [sys.executable, "-m", "lazyfs.cli", "snapshotter", "--address", str(self.address),
                   "--root", str(self.root)]
        if self.config is not None:
            command += ["--config", str(self.config)]
        env = {**os.environ, "LAZYFS_RUN_DIR": str(self.run_dir)} if self.run_dir else None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO_ROOT, env=env)
        _wait_for_socket(self.address, self.process, self.log_path, "lazyfs snapshotter")

    def stop(self) -> int | None:
        """Stop the server gracefully (SIGTERM); its exit status, or None if it was not running."""
        process, self.process = self.process, None
        _stop(process)
        return None if process is None else process.returncode

    def restart(self) -> None:
        """Stop and start again on the same socket and root."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def client(self) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
        """A snapshots API stub on a fresh channel to the server."""
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            yield snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]


@dataclasses.dataclass
class Containerd:
    """A private containerd using the ``lazyfs`` proxy snapshotter."""

    workdir: Path
    snapshotter: SnapshotterProcess
    namespace: str = dataclasses.field(default_factory=lambda: f"lazyfs-test-{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def root(self) -> Path:
        return self.workdir / "containerd-root"

    @property
    def state(self) -> Path:
        return self.workdir / "containerd-state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def config_text(self) -> str:
        """containerd's config: private paths, then the lazyfs settings merged by ``snapshotter.setup``."""
        base = f"""version = 2
root = "{self.root}"
state = "{self.state}"

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{self.workdir}/cni/bin"
      conf_dir = "{self.workdir}/cni/conf"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{self.workdir}/opt"
"""
        return configure_containerd(base, PROXY_NAME, str(self.snapshotter.address))

    def start(self) -> None:
        """Start containerd; return once its socket accepts connections."""
        config = self.workdir / "containerd.toml"
        config.write_text(self.config_text())
        env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log,
                                            env=env, start_new_session=True)
        _wait_for_socket(self.address, self.process, self.log_path, "containerd")

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, namespace: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK -n NS ARGS`` (NS: *namespace* or the test's; environment *env* or ours); fails with both
        logs when *check* and the command fails."""
        command = ["ctr", "-a", str(self.address), "-n", namespace or self.namespace, *args]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                                 f"--- containerd log:\n{log_tail(self.log_path)}\n"
                                 f"--- snapshotter log:\n{log_tail(self.snapshotter.log_path)}")
        return proc

    def stop(self) -> None:
        """Kill and delete every task and container, stop containerd, then any shim it left behind."""
        if self.process is not None and self.process.poll() is None:
            for namespace in (self.namespace, CRI_NAMESPACE):
                for task in self._ids("tasks", namespace):
                    self.ctr("tasks", "delete", "--force", task, check=False, timeout=20, namespace=namespace)
                for container in self._ids("containers", namespace):
                    self.ctr("containers", "delete", container, check=False, timeout=20, namespace=namespace)
        _stop(self.process)
        self.process = None
        _kill_shims(self.address)
        _remove_runc_state(self.namespace)
        _remove_cgroups(self.namespace)
        _remove_cgroups(CRI_NAMESPACE)  # only empty ones: other containerds may be using this namespace
        with contextlib.suppress(OSError):
            (_RUNC_STATE / CRI_NAMESPACE).rmdir()  # likewise, only if empty

    def _ids(self, kind: str, namespace: str) -> list[str]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.ctr(kind, "ls", "-q", check=False, timeout=20, namespace=namespace).stdout.split()
        return []


def _kill_shims(address: Path) -> None:
    """SIGKILL the containerd shims started for the containerd listening on *address*."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and os.fsencode(address) in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _remove_runc_state(namespace: str) -> None:
    """Kill and delete containers runc still knows in *namespace* (after a crash), then its state dir."""
    state = _RUNC_STATE / namespace
    if not state.exists():
        return
    for container in (p.name for p in state.iterdir() if p.is_dir()):
        subprocess.run(["runc", "--root", str(state), "delete", "--force", container], capture_output=True,
                       check=False, timeout=20)
    shutil.rmtree(state, ignore_errors=True)


def _remove_cgroups(namespace: str) -> None:
    """Remove the (empty) per-namespace cgroups containers of *namespace* were placed under."""
    for controller in _CGROUP_ROOT.iterdir() if _CGROUP_ROOT.is_dir() else ():
        for directory, _, _ in os.walk(controller / namespace, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def unmount_all_under(path: Path) -> None:
    """Lazily unmount every mount at or below *path*, deepest first."""
    for point in mountpoints_under(path):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A fresh short directory under /tmp; whatever is mounted below it is unmounted before it is removed."""
    path = Path(tempfile.mkdtemp(prefix="lzct-", dir="/tmp"))
    try:
        yield path
    finally:
        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def snapshotter(private_dir: Path) -> Iterator[SnapshotterProcess]:
    """A running ``lazyfs snapshotter`` with a private socket, root, chunk cache and run dir.

    Nydus images are mounted lazily from registries on 127.0.0.1, reached over plain HTTP.
    """
    config = private_dir / "snapshotter.toml"
    config.write_text(f'[lazyfs]\nmode = "fuse"\ncache_dir = "{private_dir / "cache"}"\nplain_http = ["127.0.0.1"]\n')
    server = SnapshotterProcess(private_dir / "snapshotter-root", private_dir / "snapshotter.sock",
                                private_dir / "snapshotter.log", config=config, run_dir=private_dir / "run")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def containerd(private_dir: Path, snapshotter: SnapshotterProcess) -> Iterator[Containerd]:
    """A running private containerd with ``snapshotter`` registered as proxy plugin ``lazyfs``."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    missing = [tool for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
               if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian packages containerd runc)")
    daemon = Containerd(private_dir, snapshotter)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
