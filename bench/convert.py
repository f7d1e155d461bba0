"""Conversion speed and memory: `lazyfs build` of a Debian rootfs against `tar -c | zstd -3`.

Prints MB/s for both (measured in the same run, page cache warm for both) and their ratio, plus the
peak RSS of building from a generated 1 GiB layer tar and of `lazyfs convert` of an image made of it
in a local docker-registry (target: < 300 MB). Target ratio: >= 0.5.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path

import trio

from bench.common import LAZYFS, rootfs, run, tree_bytes
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.manifest import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, build_manifest
from tests.registry_fixtures import run_registry


def make_layer_tar(path: Path, size: int) -> None:
    """A layer tar of *size* bytes: 16 MiB files, alternately random and compressible text."""
    part = path.with_suffix(".part")
    with tarfile.open(path, "w") as tar:
        written, i = 0, 0
        while written < size:
            n = min(16 << 20, size - written)
            if i % 2:
                part.write_bytes(os.urandom(n))
            else:
                part.write_bytes(b"".join(b"line %d of file %d of a compressible layer\n" % (k, i)
                                          for k in range(n // 30))[:n])
            tar.add(part, arcname=f"data/file-{i:05d}")
            written += n
            i += 1
    part.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layer-mb", type=int, default=1024, help="size of the generated layer tar")
    args = parser.parse_args()
    src = rootfs()
    size = tree_bytes(src)
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-") as tmp:
        work = Path(tmp)
        baseline_cmd = f"tar -C {shlex.quote(str(src))} -cf - . | zstd -3 -q -c > {work}/rootfs.tar.zst"
        run(baseline_cmd, shell=True)  # warm the page cache for both contenders
        baseline = run(baseline_cmd, shell=True)
        ours = run([*LAZYFS, "build", str(src), "--bootstrap", str(work / "boot"), "--blob-dir", str(work / "b")])
        print(f"rootfs {src}: {size / 1e6:.0f} MB of file data")
        print(f"  tar | zstd -3 : {size / 1e6 / baseline.seconds:8.1f} MB/s ({baseline.seconds:.2f} s)")
        print(f"  lazyfs build  : {size / 1e6 / ours.seconds:8.1f} MB/s ({ours.seconds:.2f} s), "
              f"peak RSS {ours.peak_rss_mb:.0f} MB")
        print(f"  ratio lazyfs/baseline: {baseline.seconds / ours.seconds:.2f}x (target >= 0.5x)")
        layer = work / "layer.tar"
        make_layer_tar(layer, args.layer_mb << 20)
        big = run([*LAZYFS, "build", str(layer), "--bootstrap", str(work / "boot2"), "--blob-dir", str(work / "b2")])
        print(f"build of a {layer.stat().st_size / 1e6:.0f} MB layer tar: {big.seconds:.1f} s, "
              f"peak RSS {big.peak_rss_mb:.0f} MB (target < 300 MB)")
        with run_registry(work / "registry") as registry:
            ref = trio.run(push_layer_image, registry.host, layer)
            conv = run([*LAZYFS, "convert", "--plain-http", ref, f"{registry.host}/bench/nydus:1"])
        print(f"convert of a {layer.stat().st_size / 1e6:.0f} MB layer (gzip, through docker-registry): "
              f"{conv.seconds:.1f} s, peak RSS {conv.peak_rss_mb:.0f} MB (target < 300 MB)")


async def push_layer_image(host: str, layer: Path, repo: str = "bench/src") -> str:
    """Push a one-layer image made of the gzip'ed *layer* tar to *repo* (tag 1); return its reference."""
    gz = layer.with_suffix(".tar.gz")
    with layer.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    async with RegistryClient(host, plain_http=True, docker_config=False) as client:
        layer_digest = await client.push_blob(repo, gz)
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": ["sha256:" + sha256_file(layer)]}}).encode()
        config_desc = Descriptor(OCI_CONFIG, await client.push_blob(repo, config), len(config))
        manifest = build_manifest(config_desc, [Descriptor(OCI_LAYER_GZIP, layer_digest, gz.stat().st_size)])
        ref = f"{host}/{repo}:1"
        await client.put_manifest(ref, manifest, OCI_MANIFEST)
    return ref


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    main()
