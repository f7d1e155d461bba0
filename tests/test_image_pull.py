"""``lazyfs image pull`` against a real containerd and docker-registry: plain OCI images are unpacked through
the lazyfs snapshotter; Nydus data layers stay remote (never downloaded); ``ctr run`` starts both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lazyfs.convert.converter import convert_image
from lazyfs.registry.manifest import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Descriptor, ImageManifest, build_index
from snapshotter.pull import chain_ids, snapshot_labels
from tests.containerd_fixtures import REPO_ROOT, Containerd, log_tail
from tests.registry_fixtures import RegistryServer, free_port, push_test_image
from tests.test_snapshotter import busybox_layers

SNAPSHOTTER = "lazyfs"


def run_pull(containerd: Containerd, *args: str) -> subprocess.CompletedProcess[str]:
    """``lazyfs image pull --plain-http --address SOCK --namespace NS ARGS`` for the test's containerd."""
    command = [sys.executable, "-m", "lazyfs.cli", "image", "pull", "--plain-http", "--address",
               str(containerd.address), "--namespace", containerd.namespace, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def lazyfs_pull(containerd: Containerd, ref: str) -> subprocess.CompletedProcess[str]:
    """Pull *ref* through the lazyfs snapshotter; fails with all logs unless that succeeds."""
    proc = run_pull(containerd, ref)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{logs(containerd)}"
    return proc


def logs(containerd: Containerd) -> str:
    return (f"--- containerd log:\n{log_tail(containerd.log_path)}\n"
            f"--- snapshotter log:\n{log_tail(containerd.snapshotter.log_path)}")


def blob_gets(registry: RegistryServer, since: int = 0) -> list[str]:
    """Digests of the blobs GET from the registry (after the first *since* log entries)."""
    entries = registry.access_log()[since:]
    return [e.path.rsplit("/", 1)[1] for e in entries if e.method == "GET" and "/blobs/" in e.path]


def snapshot_info(containerd: Containerd, key: str) -> dict[str, object]:
    """``ctr snapshots info`` of *key* in the lazyfs snapshotter."""
    info: dict[str, object] = json.loads(containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", key).stdout)
    return info


def committed_snapshots(containerd: Containerd) -> list[str]:
    """Names of the committed snapshots containerd lists for the lazyfs snapshotter."""
    rows = [line.split() for line in containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
            .splitlines()[1:]]
    return [row[0] for row in rows if row[-1] == "Committed"]


def collect_garbage(containerd: Containerd) -> None:
    """Run containerd's garbage collection now (deleting a lease with --sync does), after checking that the pull
    left no lease behind."""
    assert containerd.ctr("leases", "ls", "-q").stdout.split() == []
    lease = containerd.ctr("leases", "create").stdout.split()[0]
    containerd.ctr("leases", "rm", "--sync", lease)


def run_hi(containerd: Containerd, ref: str, name: str) -> str:
    """The output of a container of *ref* that says hi and shows /etc/msg."""
    try:
        run = containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, "/bin/sh", "-c",
                             "echo hi; /bin/cat /etc/msg", timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ctr run {ref} hung\n{logs(containerd)}") from None
    return run.stdout


async def test_pull_and_run_oci_image(registry: RegistryServer, containerd: Containerd) -> None:
    async with registry.client() as client:
        image = await push_test_image(client, "lazyfs/busybox", None, busybox_layers())
        ref = f"{registry.host}/lazyfs/busybox:1"  # an index: the pull picks linux/amd64
        index = await client.put_manifest(ref, build_index([image.manifest]), OCI_INDEX)

    proc = lazyfs_pull(containerd, ref)
    assert proc.stderr.count("unpacked (") == 2 and "remote" not in proc.stderr, proc.stderr
    assert proc.stdout == f"{ref}@{image.manifest.digest}: unpacked into lazyfs (2 unpacked)\n"
    assert ref in containerd.ctr("images", "ls", "-q").stdout.split()
    assert set(blob_gets(registry)) >= {layer.digest for layer in image.layers}
    collect_garbage(containerd)  # the image references manifest, config, layers and (via the config) snapshots
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert set(content) == {index, image.manifest.digest, *image.blobs}  # blobs: config and layers

    diff_ids = json.loads(image.blobs[image.config.digest])["rootfs"]["diff_ids"]
    chain = chain_ids(diff_ids)
    assert sorted(committed_snapshots(containerd)) == sorted(chain)
    labels = snapshot_info(containerd, chain[-1])["Labels"]
    assert isinstance(labels, dict)
    assert labels["containerd.io/snapshot.ref"] == chain[-1]
    assert labels["containerd.io/snapshot/cri.image-ref"] == ref
    assert labels["containerd.io/snapshot/cri.layer-digest"] == image.layers[-1].digest
    assert labels["containerd.io/snapshot/cri.manifest-digest"] == image.manifest.digest

    assert run_hi(containerd, ref, "pull-oci") == "hi\nupper\n"
    assert sorted(committed_snapshots(containerd)) == sorted(chain)  # ctr run did not unpack again

    before = len(registry.access_log())
    again = lazyfs_pull(containerd, ref)
    assert again.stderr.count("already unpacked") == 2
    assert blob_gets(registry, before) == [image.config.digest]  # the config, for the diff IDs; no layer


async def test_pull_nydus_image_leaves_data_layers_remote(registry: RegistryServer, containerd: Containerd) -> None:
    async with registry.client() as client:
        source = await push_test_image(client, "lazyfs/src", "1", busybox_layers())
        ref = f"{registry.host}/lazyfs/nydus:1"
        converted = await convert_image(client, client, source.reference, ref)
    *data, bootstrap = converted.layers
    before = len(registry.access_log())

    proc = lazyfs_pull(containerd, ref)
    assert proc.stderr.count("remote (lazy)") == len(data) and proc.stderr.count("unpacked (") == 1, proc.stderr
    fetched = blob_gets(registry, before)
    assert bootstrap.digest in fetched and not {d.digest for d in data} & set(fetched), fetched
    assert ref in containerd.ctr("images", "ls", "-q").stdout.split()
    collect_garbage(containerd)
    assert len(committed_snapshots(containerd)) == len(converted.layers)

    assert run_hi(containerd, ref, "pull-nydus") == "hi\nupper\n"


async def test_pull_errors(registry: RegistryServer, containerd: Containerd, tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        proc = run_pull(containerd, *args)
        last = proc.stderr.splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("lazyfs image: "), proc
        return last

    assert "invalid image reference 'No:Such/Ref'" in fails("No:Such/Ref")
    missing = tmp_path / "containerd.sock"
    assert f"cannot reach containerd at {missing}: No such file" in fails("--address", str(missing), "a.io/b:1")
    nowhere = f"127.0.0.1:{free_port()}"  # no registry there
    assert f"connect to {nowhere} failed" in fails(f"{nowhere}/lazyfs/app:1")
    assert "not found" in fails(f"{registry.host}/lazyfs/missing:1").lower()

    async with registry.client() as client:
        source = await push_test_image(client, "lazyfs/src", "1", busybox_layers())
        nydus = f"{registry.host}/lazyfs/nydus:1"
        await convert_image(client, client, source.reference, nydus)
    assert "is a Nydus data blob" in fails("--snapshotter", "overlayfs", nydus)
    top = source.layers[-1]
    registry.blob_path(top.digest).write_bytes(bytes(top.size))
    assert f"write {top.digest} to the content store" in fails(source.reference)
    assert containerd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.splitlines()[1:] == []
    assert all("Committed" in line for line in containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
               .stdout.splitlines()[1:])  # the aborted extraction snapshot was removed
    assert containerd.ctr("content", "active").stdout.splitlines()[1:] == []
    assert containerd.ctr("leases", "ls", "-q").stdout.split() == []
    assert containerd.ctr("images", "ls", "-q").stdout.split() == []


def test_snapshot_labels_cut_the_layer_list_to_fit() -> None:
    layers = tuple(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", f"sha256:{i:064x}", 1,
                              {"containerd.io/snapshot/nydus-blob": "true", "org.example/other": "x"})
                   for i in range(100))
    config = Descriptor(OCI_CONFIG, "sha256:" + "e" * 64, 2)
    manifest = ImageManifest(OCI_MANIFEST, "sha256:" + "f" * 64, b"{}", config, layers)
    labels = snapshot_labels("reg/app:1", manifest, 1, "sha256:" + "c" * 64)
    listed = labels["containerd.io/snapshot/cri.image-layers"].split(",")
    assert listed[0] == layers[1].digest and 50 < len(listed) < 99
    assert len("containerd.io/snapshot/cri.image-layers") + len(",".join(listed)) <= 4096
    assert labels["containerd.io/snapshot/nydus-blob"] == "true" and "org.example/other" not in labels
