"""The Nydus remote backend, driven through the snapshots API exactly as containerd's unpacker does."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from lazyfs.convert.converter import convert_image, read_small_blob
from lazyfs.convert.nydus_image import LABEL_NYDUS_BLOB
from lazyfs.fuse.records import load_records
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from tests.containerd_fixtures import SnapshotterProcess
from tests.registry_fixtures import RegistryServer, push_test_image
from tests.test_convert import image_layers

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainIDs of a layer stack."""
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


@contextmanager
def mounted(mounts: list[object], target: Path) -> Iterator[Path]:
    """Perform the mounts a snapshotter returned, as containerd would."""
    target.mkdir(parents=True, exist_ok=True)
    (mount,) = mounts
    options = ",".join(mount.options)  # type: ignore[attr-defined]
    subprocess.run(["mount", "-t", mount.type, "-o", options, mount.source, str(target)],  # type: ignore[attr-defined]
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


async def unpack(stub: snapshots_pb2_grpc.SnapshotsStub, registry: RegistryServer, ref: str,
                 tmp: Path, *, image_ref: bool = True) -> list[str]:
    """containerd's unpacker: Prepare each layer with labels; remote layers answer ALREADY_EXISTS.

    Without *image_ref*, the layers lack the image reference label, as a label-less client leaves them.
    """

    async def fetch() -> tuple[list[str], list[tuple[dict[str, str], bytes | None]]]:
        async with registry.client() as client:
            manifest = await client.get_manifest(ref)
            config = json.loads(await read_small_blob(client, "sn/nydus", manifest.config))
            layers = []
            for layer in manifest.layers:
                blob = None
                if layer.annotations.get(LABEL_NYDUS_BLOB) != "true":
                    blob = await read_small_blob(client, "sn/nydus", layer, cap=64 << 20)
                labels = {k: v for k, v in layer.annotations.items() if k.startswith("containerd.io/snapshot/")}
                layers.append((labels, blob))
            return config["rootfs"]["diff_ids"], layers

    diff_ids, layers = await fetch()
    chain = chain_ids(diff_ids)
    for i, (layer_labels, blob) in enumerate(layers):
        labels = {"containerd.io/snapshot.ref": chain[i], **layer_labels}
        if image_ref:
            labels["containerd.io/snapshot/cri.image-ref"] = ref
        key = f"extract-{i} {chain[i]}"
        parent = chain[i - 1] if i else ""
        try:
            reply = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS and blob is None, exc.details()
            assert stub.Stat(pb.StatSnapshotRequest(key=chain[i])).info.parent == parent
            continue
        assert blob is not None, "a Nydus data layer was not claimed as remote"
        with mounted(list(reply.mounts), tmp / f"layer-{i}") as target, \
                tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            tar.extractall(target, filter="tar")
        stub.Commit(pb.CommitSnapshotRequest(name=chain[i], key=key, labels=labels))
    return chain


async def _image(registry: RegistryServer) -> str:
    async with registry.client() as client:
        pushed = await push_test_image(client, "sn/src", "1", image_layers())
        await convert_image(client, client, pushed.reference, f"{registry.host}/sn/nydus:1")
    return f"{registry.host}/sn/nydus:1"


async def test_containers_run_on_a_lazy_mount(registry: RegistryServer, snapshotter: SnapshotterProcess,
                                              tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts need root")
    ref = await _image(registry)
    before = registry.bytes_served()
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path)
        nydus_blob_bytes = registry.bytes_served() - before
        reply = stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/ctr", parent=chain[-1]))
        (mount,) = reply.mounts
        assert mount.type == "overlay" and any(o.startswith("lowerdir=") and "lazyfs" in o for o in mount.options)
        with mounted(list(reply.mounts), tmp_path / "rootfs") as rootfs:
            assert (rootfs / "etc" / "passwd").read_text() == PASSWD
            (rootfs / "written-by-container").write_text("rw layer works")
        view = stub.View(pb.ViewSnapshotRequest(key="default/1/view", parent=chain[-1]))
        with mounted(list(view.mounts), tmp_path / "view") as rootfs:
            assert (rootfs / "bin" / "busybox").stat().st_size > 0
        lazy_mount = Path(mount.options[-1].removeprefix("lowerdir="))
        assert os.path.ismount(lazy_mount)
        for key in ["default/1/ctr", "default/1/view", *reversed(chain)]:
            stub.Remove(pb.RemoveSnapshotRequest(key=key))
        assert not os.path.ismount(lazy_mount)
    assert nydus_blob_bytes < 100_000  # only the bootstrap layer, never the multi-MiB data blobs


async def test_image_mount_starts_when_the_bootstrap_layer_is_committed(
        registry: RegistryServer, snapshotter: SnapshotterProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts need root")
    monkeypatch.setenv("LAZYFS_RUN_DIR", str(snapshotter.run_dir))  # where load_records() looks
    ref = await _image(registry)
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path)
        deadline = time.monotonic() + 30
        while not (records := load_records()) and time.monotonic() < deadline:  # no container asked yet
            time.sleep(0.05)
        (record,) = records
        assert record.alive() and os.path.ismount(record.mountpoint)
        reply = stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=chain[-1]))
        assert list(reply.mounts[0].options)[-1] == f"lowerdir={record.mountpoint}"  # that very mount
        assert load_records() == [record]


async def test_snapshotter_restart_adopts_the_image_mount(registry: RegistryServer,
                                                          snapshotter: SnapshotterProcess, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts need root")
    ref = await _image(registry)
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path)
        first = stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=chain[-1]))
    with mounted(list(first.mounts), tmp_path / "c1") as rootfs:
        snapshotter.process.kill()  # type: ignore[union-attr]
        snapshotter.process.wait()  # type: ignore[union-attr]
        assert (rootfs / "etc" / "passwd").read_text() == PASSWD  # the container keeps reading
        snapshotter.start()
        with snapshotter.client() as stub:
            second = stub.Prepare(pb.PrepareSnapshotRequest(key="c2", parent=chain[-1]))
            assert list(second.mounts[0].options)[-1] == list(first.mounts[0].options)[-1]  # same image mount
            with mounted(list(second.mounts), tmp_path / "c2") as again:
                assert (again / "app" / "config.json").read_text() == '{"x": 1}\n'


async def test_snapshotter_start_remounts_a_dead_image_mount(registry: RegistryServer,
                                                             snapshotter: SnapshotterProcess, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts need root")
    monkeypatch.setenv("LAZYFS_RUN_DIR", str(snapshotter.run_dir))  # where load_records() looks
    ref = await _image(registry)
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path)
        stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=chain[-1]))
    snapshotter.stop()
    (dead,) = load_records()
    os.kill(dead.pid, signal.SIGKILL)

    snapshotter.start()  # recovers before it serves: no Prepare or Mounts needed
    (record,) = load_records()
    assert record.pid != dead.pid and record.alive() and os.path.ismount(record.mountpoint)
    assert "event=remounted" in snapshotter.log_path.read_text()
    with snapshotter.client() as stub:
        second = stub.Prepare(pb.PrepareSnapshotRequest(key="c2", parent=chain[-1]))
    with mounted(list(second.mounts), tmp_path / "c2") as rootfs:
        assert (rootfs / "etc" / "passwd").read_text() == PASSWD
    snapshotter.restart()
    assert "event=adopted" in snapshotter.log_path.read_text() and load_records() == [record]


async def test_missing_image_ref_is_a_clear_error(registry: RegistryServer, snapshotter: SnapshotterProcess,
                                                  tmp_path: Path) -> None:
    ref = await _image(registry)
    with snapshotter.client() as stub:
        chain = await unpack(stub, registry, ref, tmp_path, image_ref=False)
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key="c", parent=chain[-1]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "image reference" in (err.value.details() or "")
