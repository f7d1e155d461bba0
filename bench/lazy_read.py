"""Lazy reads from a registry on loopback: the Debian rootfs as a one-layer OCI image in a local
docker-registry, converted with `lazyfs convert`, mounted with `--mode fuse` and `--mode erofs` (fresh
empty cache each mount).

Per mode: the time from `lazyfs mount` start to a usable mount; first-byte and full-read latency of
small files (~10 KB, each cold, chosen so that no two share a fetch), medians; and bytes fetched per
byte read, from `lazyfs status --json` and from the registry's access log. Baseline in the same run:
downloading the whole image, as a pull-everything-before-start runtime does.
"""

from __future__ import annotations

import argparse
import os
import stat
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from bench.common import LAZYFS, MountError, lazyfs_mount, lazyfs_status, rootfs, run, tree_bytes
from bench.convert import push_layer_image
from lazyfs.chunks.fetcher import FetchOptions
from lazyfs.rafs.reader import Bootstrap
from lazyfs.registry.manifest import INDEX_TYPES, MANIFEST_TYPES
from tests.registry_fixtures import RegistryServer, run_registry

MERGE_WINDOW = FetchOptions().merge_window  # picked files lie at least twice this far apart


@dataclass
class Round:
    """One mount with a fresh cache: its start time, per-file latencies and byte counts."""

    mount_seconds: float
    first_byte: list[float]
    full_read: list[float]
    app_bytes: int
    lazyfs_read: int
    fetched: int
    fetch_seconds: float  # mean time of one backend fetch (range read, decompress, verify) in the daemon
    registry_mount: int
    registry_reads: int


def pull_all(host: str, repo: str, tag: str) -> tuple[float, int]:
    """Seconds and bytes to GET the manifest (through an index), config and every layer of an image."""
    accept = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
    total = 0
    start = time.perf_counter()
    with httpx.Client(base_url=f"http://{host}/v2/{repo}", headers={"Accept": accept}, timeout=60) as client:
        reply = client.get(f"/manifests/{tag}").raise_for_status()
        total += len(reply.content)
        manifest = reply.json()
        if manifest.get("mediaType") in INDEX_TYPES:
            reply = client.get(f"/manifests/{manifest['manifests'][0]['digest']}").raise_for_status()
            total += len(reply.content)
            manifest = reply.json()
        for desc in [manifest["config"], *manifest["layers"]]:
            with client.stream("GET", f"/blobs/{desc['digest']}") as blob:
                blob.raise_for_status()
                for piece in blob.iter_bytes(1 << 20):
                    total += len(piece)
    return time.perf_counter() - start, total


def pick_files(boot_path: Path, count: int, low: int, high: int) -> list[str]:
    """*count* regular files of *low*..*high* bytes held in one chunk each, spread over the blobs so that no
    two are within two merge windows of each other (each read is a separate cold fetch)."""
    boot = Bootstrap.open(boot_path)
    found: dict[int, str] = {}  # position of the file's chunk -> path (hardlinks share a chunk)
    stack = [(boot.root_nid, "")]
    while stack:
        nid, path = stack.pop()
        for name, child, _ in boot.readdir(boot.inode(nid)):
            if name in (b".", b".."):
                continue
            info, child_path = boot.inode(child), f"{path}/{os.fsdecode(name)}"
            if info.is_dir:
                stack.append((child, child_path))
            elif stat.S_ISREG(info.mode) and low <= info.size <= high and len(chunks := boot.chunks(info)) == 1:
                found[(chunks[0].blob_index << 48) + chunks[0].compressed_offset] = child_path
    positions = sorted(found)
    if not positions:
        raise SystemExit(f"no files of {low}..{high} bytes in the image")
    lo, hi = positions[0], positions[-1]
    picked: list[int] = []
    for k in range(count):
        target = lo + (hi - lo) * k // count
        pos = next((p for p in positions if p >= target and (not picked or p >= picked[-1] + 2 * MERGE_WINDOW)),
                   None)
        if pos is not None:
            picked.append(pos)
    return [found[p] for p in picked]


def cold_read(path: Path) -> tuple[float, float, int]:
    """Seconds from open to the first byte and to the last byte of *path*, and its size."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = len(os.read(fd, 1))
        first = time.perf_counter() - start
        while piece := os.read(fd, 1 << 20):
            size += len(piece)
        return first, time.perf_counter() - start, size
    finally:
        os.close(fd)


def mount_round(ref: str, mode: str, work: Path, registry: RegistryServer, files: list[str], args: argparse.Namespace,
                index: int) -> tuple[Round, list[str]]:
    """Mount *ref* with a fresh cache, read *files* (picked from the image when empty) cold, unmount."""
    cache, mnt = work / f"cache-{mode}-{index}", work / f"mnt-{mode}"
    before = registry.bytes_served("/v2/")
    with lazyfs_mount(ref, mnt, "--plain-http", "--mode", mode, "--cache-dir", str(cache)) as mount_seconds:
        after_mount = registry.bytes_served("/v2/")
        if not files:
            files = pick_files(next((cache / "bootstraps").glob("*.boot")), args.files, args.min_kb << 10,
                               args.max_kb << 10)
        reads = [cold_read(mnt / f.lstrip("/")) for f in files]
        status = lazyfs_status(mnt)
    fetch = status["fetch"]
    result = Round(mount_seconds, [r[0] for r in reads], [r[1] for r in reads], sum(r[2] for r in reads),
                   status["bytes_read"], status["bytes_fetched"], fetch["latency_sum"] / sum(fetch["latency_counts"]),
                   after_mount - before, registry.bytes_served("/v2/") - after_mount)
    return result, files


COLUMNS = (("mount s", "{:10.2f}"), ("1st byte", "{:10.1f}"), ("full read", "{:10.1f}"), ("fetch ms", "{:10.1f}"),
           ("app KB", "{:10.1f}"), ("lazyfs KB", "{:10.1f}"), ("fetch KB", "{:10.1f}"), ("fetch/app", "{:9.1f}x"),
           ("reg KB mnt", "{:10.1f}"), ("reg KB rd", "{:10.1f}"))  # each cell 10 characters wide


def report_mode(mode: str, rounds: list[Round]) -> None:
    """One table row: medians over rounds (and over every file for the latencies)."""
    def med(values: list[float] | list[int]) -> float:
        return statistics.median(values)

    app, fetched = med([r.app_bytes for r in rounds]), med([r.fetched for r in rounds])
    row = (med([r.mount_seconds for r in rounds]), med([t for r in rounds for t in r.first_byte]) * 1e3,
           med([t for r in rounds for t in r.full_read]) * 1e3, med([r.fetch_seconds for r in rounds]) * 1e3,
           app / 1e3, med([r.lazyfs_read for r in rounds]) / 1e3, fetched / 1e3, fetched / app,
           med([r.registry_mount for r in rounds]) / 1e3, med([r.registry_reads for r in rounds]) / 1e3)
    print(f"{mode:6}" + "".join(" " + fmt.format(value) for (_, fmt), value in zip(COLUMNS, row, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10, help="small files read per mount")
    parser.add_argument("--min-kb", type=int, default=6, help="smallest file size picked, in KiB")
    parser.add_argument("--max-kb", type=int, default=14, help="largest file size picked, in KiB")
    parser.add_argument("--rounds", type=int, default=3, help="mounts per mode, each with a fresh cache")
    parser.add_argument("--work-dir", help="parent of the scratch directory (default: system temp)")
    args = parser.parse_args()
    src = rootfs()
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-lazy-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        os.environ["LAZYFS_RUN_DIR"] = str(work / "run")
        layer = work / "layer.tar"
        subprocess.run(["tar", "-C", str(src), "--numeric-owner", "-cf", str(layer), "."], check=True)
        with run_registry(work / "registry") as registry:
            ref = trio.run(push_layer_image, registry.host, layer)
            layer.unlink()
            nydus = f"{registry.host}/bench/nydus:1"
            conv = run([*LAZYFS, "convert", "--plain-http", ref, nydus])
            oci_s, oci_bytes = pull_all(registry.host, "bench/src", "1")
            nydus_s, nydus_bytes = pull_all(registry.host, "bench/nydus", "1")
            print(f"image: {src} ({tree_bytes(src) / 1e6:.0f} MB of files) as a one-layer gzip OCI image, "
                  f"lazyfs convert in {conv.seconds:.1f} s")
            print("registry-only baseline, whole image pulled before start (docker-registry on loopback):")
            print(f"  OCI image   {oci_bytes / 1e6:7.1f} MB in {oci_s:.2f} s")
            print(f"  Nydus image {nydus_bytes / 1e6:7.1f} MB in {nydus_s:.2f} s")
            files: list[str] = []
            results: dict[str, list[Round]] = {}
            failures: dict[str, str] = {}
            for mode in ("fuse", "erofs"):
                try:
                    for i in range(args.rounds):
                        result, files = mount_round(nydus, mode, work, registry, files, args, i)
                        results.setdefault(mode, []).append(result)
                except (MountError, OSError) as exc:
                    failures[mode] = str(exc).strip().splitlines()[-1]
                    results.pop(mode, None)
    print(f"cold reads of {len(files)} files of {args.min_kb}-{args.max_kb} KiB per mount, {args.rounds} mounts "
          f"per mode, fresh cache each: {', '.join(files)}")
    print(f"{'mode':6}" + "".join(f" {title:>10}" for title, _ in COLUMNS))
    for mode, rounds in results.items():
        report_mode(mode, rounds)
    for mode, why in failures.items():
        print(f"{mode:6} not available: {why}")
    print("latencies in ms, median over files x mounts; 'mount s': `lazyfs mount` start to usable mount; 'fetch ms': "
          "mean daemon-side time of one backend fetch\n(range GET, decompress, verify); 'lazyfs KB': status bytes_read "
          "(erofs mode: what the kernel read from the blob devices);\n'fetch KB': status bytes_fetched; 'reg KB': "
          "registry access log bytes at mount (manifest, bootstrap) / for the reads")


if __name__ == "__main__":
    main()
