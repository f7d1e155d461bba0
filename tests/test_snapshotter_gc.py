"""GC acceptance: once containers and images are gone and containerd's GC has run, the lazyfs snapshotter
holds no mounts, no mount daemons and no snapshot directories."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from lazyfs.convert.converter import convert_image
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.containerd_fixtures import Containerd, SnapshotterProcess
from tests.registry_fixtures import RegistryServer, push_test_image
from tests.test_image_pull import SNAPSHOTTER, lazyfs_pull, logs
from tests.test_snapshotter import busybox_layers
from tests.test_snapshotter_nydus import _image, mounted, unpack


def lazyfs_mounts(root: Path) -> list[str]:
    """Mount points of lazyfs (FUSE or EROFS) mounts at or below *root*."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        if point.startswith(str(root)) and (fstype.startswith("fuse.lazyfs") or fstype == "erofs"):
            found.append(point)
    return found


def mount_daemons(run_dir: Path | None) -> list[int]:
    """Pids of mount daemons (processes holding /dev/fuse) started by the snapshotter that uses *run_dir*.

    Daemons start as waiting standby processes, so their command line does not name their mount.
    """
    assert run_dir is not None
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if os.fsencode(f"LAZYFS_RUN_DIR={run_dir}") in environ and any(
                    os.readlink(fd) == "/dev/fuse" for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


async def test_gc_leaves_no_mounts_daemons_or_snapshots(registry: RegistryServer, containerd: Containerd) -> None:
    async with registry.client() as client:
        source = await push_test_image(client, "lazyfs/src", "1", busybox_layers())
        ref = f"{registry.host}/lazyfs/nydus:1"
        await convert_image(client, client, source.reference, ref)
    lazyfs_pull(containerd, ref)
    for name in ("gc-1", "gc-2"):
        containerd.ctr("run", "--snapshotter", SNAPSHOTTER, ref, name, "/bin/cat", "/etc/msg", timeout=30)
    root = containerd.snapshotter.root
    run_dir = containerd.snapshotter.run_dir
    assert run_dir is not None
    assert len(lazyfs_mounts(root)) == 1 and len(mount_daemons(run_dir)) == 1, logs(containerd)

    for name in ("gc-1", "gc-2"):
        containerd.ctr("containers", "delete", name)  # ctr run deleted the task when it exited
    containerd.ctr("images", "rm", "--sync", ref)

    assert containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:] == []
    assert lazyfs_mounts(root) == [], logs(containerd)
    assert mount_daemons(run_dir) == [], logs(containerd)
    assert list(run_dir.glob("mounts/*/mount.json")) == []
    assert list((root / "snapshots").iterdir()) == [] and list((root / "trash").iterdir()) == []


async def test_remove_unmounts_a_busy_image_mount(registry: RegistryServer, snapshotter: SnapshotterProcess,
                                                  tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts need root")
    ref = await _image(registry)
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path)
        reply = stub.Prepare(pb.PrepareSnapshotRequest(key="busy", parent=chain[-1]))
        with mounted(list(reply.mounts), tmp_path / "rootfs") as rootfs:
            fd = os.open(rootfs / "etc" / "passwd", os.O_RDONLY)  # keeps the image mount busy
            for key in ["busy", *reversed(chain)]:
                stub.Remove(pb.RemoveSnapshotRequest(key=key))
            assert lazyfs_mounts(snapshotter.root) == [] and mount_daemons(snapshotter.run_dir) == []
            with contextlib.suppress(OSError):  # ENOTCONN: the detached mount's daemon is gone
                os.close(fd)
    assert list((snapshotter.root / "snapshots").iterdir()) == []
