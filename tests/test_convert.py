"""End to end: an OCI image in a real docker-registry converts to a Nydus image whose tree is the
image's flattened tree, as umoci (an independent implementation of OCI layer semantics) sees it."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lazyfs.convert.converter import convert_image, read_small_blob
from lazyfs.convert.nydus_image import (
    LABEL_NYDUS_BLOB,
    LABEL_NYDUS_BOOTSTRAP,
    LABEL_NYDUS_FS_VERSION,
    NYDUS_BLOB_MEDIA_TYPE,
)
from lazyfs.errors import BuildError, FormatError
from lazyfs.rafs.builder import BuildOptions
from lazyfs.rafs.export import export_blob_data, unpack_tree
from lazyfs.rafs.loader import bootstrap_from_layer
from lazyfs.rafs.reader import Bootstrap
from lazyfs.registry.manifest import DOCKER_MANIFEST, OCI_LAYER_GZIP
from tests.kernel import erofs_mount
from tests.registry_fixtures import RegistryServer, push_test_image
from tests.walker import Entry, diff, snapshot

BUSYBOX = Path("/bin/busybox")


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime = info.mtime or 1_700_000_000
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def image_layers() -> list[bytes]:
    """Three layers exercising files, links, whiteouts, opaque dirs and type changes."""
    busybox = BUSYBOX.read_bytes() if BUSYBOX.exists() else os.urandom(2 << 20)
    d = tarfile.DIRTYPE
    base = _tar([
        (_entry("bin", d, 0o755), None), (_entry("etc", d, 0o755), None),
        (_entry("bin/busybox", mode=0o755), busybox),
        (_entry("bin/sh", tarfile.LNKTYPE, 0o755, linkname="bin/busybox"), None),
        (_entry("bin/ls", tarfile.SYMTYPE, 0o777, linkname="busybox"), None),
        (_entry("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n"),
        (_entry("etc/shadow", mode=0o640, uid=0, gid=42), b"root:*:19000:0:99999:7:::\n"),
        (_entry("data", d, 0o755), None), (_entry("data/gone.txt"), b"bye"),
        (_entry("data/dir_gone", d, 0o700), None), (_entry("data/dir_gone/x"), b"x"),
        (_entry("data/opaque", d, 0o755), None), (_entry("data/opaque/a"), b"a"), (_entry("data/opaque/b"), b"b"),
        (_entry("data/becomes_file", d, 0o755), None), (_entry("data/becomes_file/inner"), b"i"),
        (_entry("tmp", d, 0o1777), None), (_entry("run/fifo", tarfile.FIFOTYPE), None),
    ])
    upper = _tar([
        (_entry("data/.wh.gone.txt"), b""), (_entry("data/.wh.dir_gone"), b""),
        (_entry("data/opaque/.wh..wh..opq"), b""), (_entry("data/opaque/c"), b"c"),
        (_entry("data/becomes_file", mode=0o600), b"now a file"),
        (_entry("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"),
        (_entry("app", d, 0o750, uid=1000, gid=1000), None),
        (_entry("app/data.bin", uid=1000, gid=1000), os.urandom(3 << 20)),
    ])
    top = _tar([(_entry("app/config.json", uid=1000, gid=1000), b'{"x": 1}\n'), (_entry("etc/.wh.shadow"), b"")])
    return [base, upper, top]


IMPLICIT_DIRS = (b".", b"run")  # never described by a tar entry: their mtime is up to the unpacker


def undated_implicit_dirs(snap: dict[bytes, Entry]) -> dict[bytes, Entry]:
    """*snap* without the mtimes that no layer defines."""
    return {p: dataclasses.replace(e, mtime_ns=None) if p in IMPLICIT_DIRS else e for p, e in snap.items()}


def umoci_flatten(server: RegistryServer, ref: str, work: Path) -> Path:
    """The image's root filesystem as umoci unpacks it (whiteouts applied by umoci, not by us)."""
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    layout = work / "oci"
    work.mkdir(parents=True, exist_ok=True)
    for cmd in (["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:src"],
                ["umoci", "unpack", "--image", f"{layout}:src", str(work / "bundle")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stderr}"
    return work / "bundle" / "rootfs"


async def test_convert_multi_layer_image(registry: RegistryServer, tmp_path: Path) -> None:
    async with registry.client() as client:
        pushed = await push_test_image(client, "app/src", "1", image_layers())
        target = f"{registry.host}/app/nydus:1"
        result = await convert_image(client, client, pushed.reference, target)
        manifest = await client.get_manifest(target)
        config = json.loads(await read_small_blob(client, "app/nydus", manifest.config))
        boot_layer = await read_small_blob(client, "app/nydus", manifest.layers[-1], cap=64 << 20)

    assert [layer.digest for layer in manifest.layers] == [d.digest for d in result.layers]
    *data, boot = manifest.layers
    assert data and all(d.media_type == NYDUS_BLOB_MEDIA_TYPE and d.annotations == {LABEL_NYDUS_BLOB: "true"}
                        for d in data)
    assert boot.media_type == OCI_LAYER_GZIP
    assert boot.annotations == {LABEL_NYDUS_BOOTSTRAP: "true", LABEL_NYDUS_FS_VERSION: "6"}
    assert config["rootfs"]["diff_ids"][:-1] == [d.digest for d in data]
    assert len(config["rootfs"]["diff_ids"]) == len(manifest.layers)

    bootstrap = Bootstrap(bootstrap_from_layer(boot_layer))
    assert [f"sha256:{b.blob_id}" for b in bootstrap.blobs] == [d.digest for d in data]
    tree = bootstrap.to_tree()
    assert not any(b".wh." in path for path, _ in tree.walk())

    # our tree, materialised from the pushed blobs through the CLI, equals umoci's flattening
    dest = tmp_path / "ours"
    subprocess.run([sys.executable, "-m", "lazyfs.cli", "unpack", target, str(dest), "--plain-http"], check=True)
    reference = umoci_flatten(registry, pushed.reference, tmp_path / "umoci")
    problems = diff(undated_implicit_dirs(snapshot(reference)), undated_implicit_dirs(snapshot(dest)))
    assert problems == [], "\n".join(problems)

    # and the kernel reads the same tree from the merged bootstrap over exported blob.data devices
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    async with registry.client() as client:
        for d in data:
            await client.fetch_blob_to_file("app/nydus", d.digest, blobs / d.digest[7:])
    (tmp_path / "boot").write_bytes(bootstrap_from_layer(boot_layer))
    devices = export_blob_data(tree, blobs, tmp_path / "export")
    with erofs_mount(tmp_path / "boot", devices, tmp_path / "mnt") as mnt:
        assert diff(undated_implicit_dirs(snapshot(reference)), undated_implicit_dirs(snapshot(mnt))) == []


async def test_convert_with_prefetch_list_keeps_a_bootstrap_kernel_and_fsck_read(
        registry: RegistryServer, tmp_path: Path) -> None:
    listed = (b"/etc/passwd", b"/bin/busybox")
    async with registry.client() as client:
        pushed = await push_test_image(client, "pf/src", "1", image_layers())
        target = f"{registry.host}/pf/nydus:1"
        await convert_image(client, client, pushed.reference, target, options=BuildOptions(prefetch=listed))
        with pytest.raises(BuildError, match="not in the image"):
            await convert_image(client, client, pushed.reference, f"{registry.host}/pf/bad:1",
                                options=BuildOptions(prefetch=(b"/data/gone.txt",)))  # whited out above
        manifest = await client.get_manifest(target)
        boot_layer = await read_small_blob(client, "pf/nydus", manifest.layers[-1], cap=64 << 20)
        blobs = tmp_path / "blobs"
        blobs.mkdir()
        for d in manifest.layers[:-1]:
            await client.fetch_blob_to_file("pf/nydus", d.digest, blobs / d.digest[7:])
    boot = tmp_path / "boot"
    boot.write_bytes(bootstrap_from_layer(boot_layer))
    tree = Bootstrap.open(boot).to_tree()
    assert tree.prefetch == list(listed)
    devices = export_blob_data(tree, blobs, tmp_path / "export")
    with erofs_mount(boot, devices, tmp_path / "mnt") as mnt:
        assert (mnt / "etc" / "passwd").read_text().startswith("root:x:0:0")
    fsck = shutil.which("fsck.erofs")
    if fsck is None:
        pytest.skip("erofs-utils not installed")
    out = tmp_path / "extracted"
    proc = subprocess.run([fsck, *(f"--device={d}" for d in devices), f"--extract={out}", str(boot)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "etc" / "passwd").read_text().startswith("root:x:0:0")


async def test_convert_docker_zstd_image_and_refuse_nydus(registry: RegistryServer, tmp_path: Path) -> None:
    layers = image_layers()[:2]
    async with registry.client() as client:
        docker = await push_test_image(client, "z/docker", "1", layers, compression="gzip", media_type=DOCKER_MANIFEST)
        zstd = await push_test_image(client, "z/zstd", "1", layers, compression="zstd")
        for source, tag in ((docker.reference, "docker"), (zstd.reference, "zstd")):
            await convert_image(client, client, source, f"{registry.host}/z/nydus:{tag}")
        with pytest.raises(FormatError, match="already a Nydus image"):
            await convert_image(client, client, f"{registry.host}/z/nydus:zstd", f"{registry.host}/z/again:1")
    unpacked = []
    for tag in ("docker", "zstd"):
        dest = tmp_path / tag
        subprocess.run([sys.executable, "-m", "lazyfs.cli", "unpack", f"{registry.host}/z/nydus:{tag}", str(dest),
                        "--plain-http"], check=True)
        unpacked.append(snapshot(dest))
    assert diff(*unpacked) == []
    assert (tmp_path / "docker" / "app" / "data.bin").stat().st_size == 3 << 20


async def test_cli_inspect_remote_image(registry: RegistryServer) -> None:
    async with registry.client() as client:
        pushed = await push_test_image(client, "i/src", "1", image_layers()[:1])
        await convert_image(client, client, pushed.reference, f"{registry.host}/i/nydus:1")
    out = subprocess.run([sys.executable, "-m", "lazyfs.cli", "inspect", "--json", "--plain-http",
                          f"{registry.host}/i/nydus:1"], check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    paths = {e["path"]: e for e in info["entries"]}
    assert paths["/bin/busybox"]["chunks"] >= 1 and paths["/bin/ls"]["target"] == "busybox"
    assert len(info["blobs"]) == 1


def test_unpack_tree_rejects_missing_blob(tmp_path: Path) -> None:
    tree = Bootstrap((Path(__file__).parents[2] / "shared/fixtures/nydus/dragonflyoss-nydus/tests/texture"
                      / "bootstrap/rafs-v6-2.2.boot").read_bytes()).to_tree()
    with pytest.raises(FormatError, match="not found"):
        unpack_tree(tree, tmp_path, tmp_path / "out")
