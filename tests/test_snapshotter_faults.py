"""Bad input through the snapshots API and through containerd: exact status codes, clear messages, and a
containerd that stays usable afterwards."""

from __future__ import annotations

import time

import grpc
import pytest

from lazyfs.convert.converter import convert_image
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.containerd_fixtures import Containerd, SnapshotterProcess
from tests.registry_fixtures import RegistryServer, push_test_image
from tests.test_image_pull import SNAPSHOTTER, lazyfs_pull, logs, run_hi
from tests.test_snapshotter import busybox_layers


def test_unknown_parent_and_oversized_labels(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key="c", parent="no such parent"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'no such parent'" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key="c", labels={"big": "x" * 4096}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceed 4096 bytes" in (err.value.details() or "")
        assert [info for reply in stub.List(pb.ListSnapshotsRequest()) for info in reply.info] == []


async def _images(registry: RegistryServer) -> tuple[str, str]:
    """A plain OCI image and a Nydus image converted from it."""
    async with registry.client() as client:
        source = await push_test_image(client, "lazyfs/src", "1", busybox_layers())
        nydus = f"{registry.host}/lazyfs/nydus:1"
        await convert_image(client, client, source.reference, nydus)
    return source.reference, nydus


def failed_run(containerd: Containerd, ref: str, name: str) -> str:
    """The error output of ``ctr run`` of *ref*, which must fail (and not hang)."""
    start = time.monotonic()
    proc = containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, "/bin/true", check=False,
                          timeout=90)
    assert proc.returncode != 0, proc.stdout
    assert time.monotonic() - start < 60, logs(containerd)
    return proc.stderr


async def test_corrupt_bootstrap_fails_the_container_prepare(registry: RegistryServer,
                                                             containerd: Containerd) -> None:
    oci, nydus = await _images(registry)
    lazyfs_pull(containerd, oci)
    lazyfs_pull(containerd, nydus)
    (boot,) = containerd.snapshotter.root.glob("snapshots/*/fs/image/image.boot")
    boot.write_bytes(b"garbage" * 1000)

    error = failed_run(containerd, nydus, "corrupt")
    assert "failed precondition" in error and "is corrupt" in error, error
    assert run_hi(containerd, oci, "still-usable") == "hi\nupper\n"


async def test_unreachable_registry_fails_the_container_prepare(registry: RegistryServer,
                                                                containerd: Containerd) -> None:
    oci, nydus = await _images(registry)
    lazyfs_pull(containerd, oci)
    lazyfs_pull(containerd, nydus)
    registry.stop()

    error = failed_run(containerd, nydus, "offline")
    assert "unavailable" in error, error
    assert f"registry {registry.host} of Nydus image {nydus} cannot be reached" in error, error
    assert run_hi(containerd, oci, "still-usable") == "hi\nupper\n"
