"""CRI acceptance: containerd's CRI plugin pulls through the lazyfs snapshotter, as the kubelet would.

A minimal CRI client (:mod:`tests.cri.client`) talks to a private containerd whose CRI snapshotter is
``lazyfs`` with snapshot annotations on; images come from a local docker-registry over plain HTTP.
Containers are started with ``ctr -n k8s.io run`` (no CNI, so no pod sandbox).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

import pytest

from lazyfs.convert.converter import convert_image
from lazyfs.convert.nydus_image import LABEL_NYDUS_BOOTSTRAP, NYDUS_BLOB_MEDIA_TYPE
from tests.containerd_fixtures import CRI_NAMESPACE, PROXY_NAME, Containerd, log_tail
from tests.cri.client import CriClient
from tests.registry_fixtures import AccessLogEntry, RegistryServer, push_test_image
from tests.test_convert import BUSYBOX, image_layers
from tests.test_snapshotter import busybox_layers


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[CriClient]:
    """A CRI client on the test containerd's socket."""
    with CriClient(containerd.address) as client:
        yield client


def run_in_cri_namespace(containerd: Containerd, image: str, *command: str) -> str:
    """The output of ``ctr -n k8s.io run --rm --snapshotter lazyfs IMAGE ID COMMAND``."""
    container = f"cri-test-{uuid.uuid4().hex[:8]}"
    return containerd.ctr("run", "--rm", "--snapshotter", PROXY_NAME, image, container, *command,
                          namespace=CRI_NAMESPACE).stdout


def blob_bytes_served(entries: Iterable[AccessLogEntry]) -> dict[str, int]:
    """Bytes the registry sent per blob digest for the GETs in *entries*."""
    served: dict[str, int] = {}
    for entry in entries:
        if entry.method == "GET" and "/blobs/" in entry.path:
            digest = entry.path.rsplit("/", 1)[-1]
            served[digest] = served.get(digest, 0) + entry.size
    return served


def snapshotter_log(containerd: Containerd) -> str:
    """The tails of the snapshotter's and containerd's logs, for assertion messages."""
    return (f"--- snapshotter log:\n{log_tail(containerd.snapshotter.log_path)}\n"
            f"--- containerd log:\n{log_tail(containerd.log_path)}")


def test_cri_version(cri: CriClient) -> None:
    version = cri.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version.startswith(("1.", "v1."))


async def test_cri_pull_plain_oci_image(registry: RegistryServer, containerd: Containerd, cri: CriClient) -> None:
    async with registry.client() as client:
        pushed = await push_test_image(client, "lazyfs/busybox", "1", busybox_layers())
    image_id = cri.pull_image(pushed.reference)
    assert image_id == pushed.config.digest

    assert [(i.id, list(i.repo_tags)) for i in cri.list_images()] == [(image_id, [pushed.reference])]
    status = cri.image_status(pushed.reference)
    assert status is not None and status.id == image_id and status.size > 0
    listing = containerd.ctr("snapshots", "--snapshotter", PROXY_NAME, "ls", namespace=CRI_NAMESPACE).stdout
    assert len(listing.splitlines()) == 3, listing  # both layers unpacked by lazyfs
    assert run_in_cri_namespace(containerd, pushed.reference, "/bin/sh", "-c", "echo ok; cat /etc/msg") == "ok\nupper\n"
    [filesystem] = cri.image_fs_info()
    assert filesystem.fs_id.mountpoint.endswith(f"io.containerd.snapshotter.v1.{PROXY_NAME}")

    cri.remove_image(pushed.reference)
    assert cri.image_status(pushed.reference) is None and cri.list_images() == []
    cri.remove_image(pushed.reference)  # idempotent


async def test_cri_pull_nydus_image_downloads_only_the_bootstrap(
    registry: RegistryServer, containerd: Containerd, cri: CriClient
) -> None:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed")
    async with registry.client() as client:
        source = await push_test_image(client, "lazyfs/app", "oci", image_layers())
        converted = await convert_image(client, client, source.reference, f"{registry.host}/lazyfs/app:nydus")
        config = (await client.get_manifest(converted.reference)).config
    *data, bootstrap = converted.layers
    assert data and all(d.media_type == NYDUS_BLOB_MEDIA_TYPE for d in data)
    assert LABEL_NYDUS_BOOTSTRAP in bootstrap.annotations
    before = len(registry.access_log())

    image_id = cri.pull_image(converted.reference)

    assert image_id == config.digest
    pull_requests = registry.access_log()[before:]
    assert set(blob_bytes_served(pull_requests)) == {bootstrap.digest, config.digest}, snapshotter_log(containerd)
    assert any(e.method == "GET" and "/manifests/" in e.path for e in pull_requests)
    assert cri.image_status(converted.reference) is not None

    output = run_in_cri_namespace(containerd, converted.reference, "/bin/busybox", "cat", "/etc/passwd")
    assert output == "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"
    served = blob_bytes_served(registry.access_log()[before:])
    data_served = sum(served.get(d.digest, 0) for d in data)
    assert 0 < data_served < sum(d.size for d in data), (served, snapshotter_log(containerd))
