"""Cached read speed: the Debian rootfs plus one big random file, read through `lazyfs mount --mode fuse`
and `--mode erofs` with the image fully in the chunk cache, against the same tree on ext4 and a kernel
EROFS mount of `lazyfs export` files over loop devices, all measured in this run.

Every measurement starts with a cold page cache (``drop_caches`` before each, for every contender), so
each test reads through the whole stack down to the disk: for lazyfs, the chunk cache files.
Tests: sequential read of the big file (1 MiB reads), random 4 KiB preads of it (fixed seed),
``tar -cf - . | cat > /dev/null`` of the rootfs, and ``chroot MNT python3 -c 'import json, email,
http.client'`` (median of several cold runs). Targets: erofs mode >= 0.9x kernel EROFS on every test;
fuse mode >= 0.5x ext4 on sequential reads and >= 0.33x on tar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench.common import LAZYFS, ROOT, MountError, drop_caches, lazyfs_mount, lazyfs_status, rootfs, run
from lazyfs.fuse.records import folder_for
from tests.kernel import erofs_mount

BIG = Path("bench/big.bin")  # the big file, inside the image
BLOCK = 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class Test:
    """One measurement: its label, unit and whether a bigger figure is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool


TESTS = (
    Test("seq", "sequential read, 1 MiB reads", "MB/s", True),
    Test("rand", "random 4 KiB preads", "reads/s", True),
    Test("tar", "tar of the rootfs", "s", False),
    Test("import", "chroot python3 imports", "s", False),
)
CONTENDERS = ("ext4", "kernel EROFS", "lazyfs fuse", "lazyfs erofs")
RATIOS = (("lazyfs fuse", "ext4"), ("lazyfs fuse", "kernel EROFS"), ("lazyfs erofs", "kernel EROFS"),
          ("lazyfs erofs", "ext4"))
# (contender, baseline, minimum speed ratio, tests it applies to)
TARGETS = (("lazyfs erofs", "kernel EROFS", 0.9, ("seq", "rand", "tar", "import")),
           ("lazyfs fuse", "ext4", 0.5, ("seq",)), ("lazyfs fuse", "ext4", 0.33, ("tar",)))


def seq_read(root: Path) -> float:
    """MB/s reading the big file from start to end in 1 MiB reads."""
    buf = bytearray(BLOCK)
    start = time.perf_counter()
    with open(root / BIG, "rb", buffering=0) as f:
        total = 0
        while n := f.readinto(buf):
            total += n
    return total / 1e6 / (time.perf_counter() - start)


def rand_read(root: Path, count: int, seed: int) -> float:
    """Page-aligned 4 KiB preads per second at offsets drawn from a seeded generator."""
    fd = os.open(root / BIG, os.O_RDONLY)
    try:
        pages, rng = os.fstat(fd).st_size // PAGE, random.Random(seed)
        offsets = [rng.randrange(pages) * PAGE for _ in range(count)]
        start = time.perf_counter()
        for offset in offsets:
            os.pread(fd, PAGE, offset)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def tar_tree(root: Path) -> float:
    """Seconds to archive the tree without the big file into a pipe (GNU tar skips data for /dev/null)."""
    cmd = f"tar -C '{root}' --exclude=./{BIG.parent} -cf - . | cat > /dev/null"
    start = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def py_import(root: Path) -> float:
    """Seconds for the image's python3 to start and import a few stdlib packages (no bytecode written)."""
    start = time.perf_counter()
    subprocess.run(["chroot", str(root), "python3", "-B", "-c", "import json, email, http.client"], check=True)
    return time.perf_counter() - start


def measure(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every test on the tree at *root*, each from a cold page cache; the median of ``--runs`` runs."""
    probes: dict[str, Callable[[], float]] = {
        "seq": lambda: seq_read(root),
        "rand": lambda: rand_read(root, args.random_reads, args.seed),
        "tar": lambda: tar_tree(root),
        "import": lambda: py_import(root),
    }
    out = {}
    for key, probe in probes.items():
        runs = []
        for _ in range(args.runs):
            drop_caches()
            runs.append(probe())
        out[key] = statistics.median(runs)
    return out


@contextlib.contextmanager
def ext4_dir(work: Path, size: int) -> Iterator[Path]:
    """A directory on ext4: *work* itself when it is on ext4, else a loop-mounted ext4 image of *size* bytes."""
    fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(work)], capture_output=True,
                            text=True, check=True).stdout.strip()
    if fstype == "ext4":
        yield work
        return
    image, mnt = work / "ext4.img", work / "ext4"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def make_image(src: Path, work: Path, big_mb: int, compressor: str) -> tuple[Path, Path, Path, list[Path]]:
    """Copy *src* into ``work/tree`` plus the big file; build and export it. Returns tree, bootstrap, blob dir,
    exported devices."""
    tree = work / "tree"
    tree.mkdir()
    subprocess.run(["cp", "-a", f"{src}/.", str(tree)], check=True)
    (tree / BIG).parent.mkdir()
    with open(tree / BIG, "wb") as f:
        for _ in range(big_mb):
            f.write(os.urandom(BLOCK))
    boot, blobs, export = work / "boot", work / "blobs", work / "export"
    build = run([*LAZYFS, "build", str(tree), "--bootstrap", str(boot), "--blob-dir", str(blobs),
                 "--compressor", compressor])
    devices = subprocess.run([*LAZYFS, "export", str(boot), "--blob-dir", str(blobs), "--out", str(export)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    print(f"image: {src} + {big_mb} MiB /{BIG}, built in {build.seconds:.1f} s ({compressor})")
    return tree, boot, blobs, [Path(d) for d in devices]


def warm_cache(boot: Path, blobs: Path, cache: Path, mnt: Path, timeout: float) -> None:
    """Fill *cache* with every chunk: mount with ``--prefetch-all`` and wait until the cache is complete."""
    start = time.perf_counter()
    with lazyfs_mount(boot, mnt, "--blob-dir", str(blobs), "--cache-dir", str(cache), "--prefetch-all"):
        while True:
            status = lazyfs_status(mnt)
            if status["state"] != "running":
                log = (folder_for(mnt) / "daemon.log").read_text(errors="replace").strip().splitlines() or ["-"]
                raise MountError(f"mount daemon {status['state']} while prefetching; its log ends: {log[-1]}")
            if status["prefetching"] == 0 and status["in_flight"] == 0:
                break
            if time.perf_counter() - start > timeout:
                raise MountError(f"prefetch not done after {timeout:.0f} s")
            time.sleep(0.2)
        fetched = status["bytes_fetched"]
    entries = json.loads(subprocess.run([*LAZYFS, "cache", "ls", "--json", "--cache-dir", str(cache)], cwd=ROOT,
                                        capture_output=True, text=True, check=True).stdout)
    missing = sum(e["chunk_count"] - e["ready_chunks"] for e in entries)
    if not entries or missing:
        raise MountError(f"cache incomplete after prefetch: {missing} chunks missing")
    seconds = time.perf_counter() - start
    print(f"cache warmed by --prefetch-all: {fetched / 1e6:.0f} MB fetched in {seconds:.1f} s")


@contextlib.contextmanager
def lazyfs_contender(mode: str, boot: Path, blobs: Path, cache: Path, mnt: Path) -> Iterator[Path]:
    """A mount of the fully cached image; checks at the end that it fetched nothing."""
    with lazyfs_mount(boot, mnt, "--mode", mode, "--blob-dir", str(blobs), "--cache-dir", str(cache)):
        yield mnt
        fetched = lazyfs_status(mnt)["bytes_fetched"]
        if fetched:
            print(f"  note: the {mode} mode mount fetched {fetched} bytes: the cache was not complete")


def speedup(test: Test, figure: float, baseline: float) -> float:
    """How many times faster *figure* is than *baseline* (a throughput ratio, or inverse time ratio)."""
    return figure / baseline if test.higher_is_better else baseline / figure


def report(results: dict[str, dict[str, float]], failures: dict[str, str]) -> None:
    """The table of figures and ratios, then the targets and the published anchors."""
    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    def ratio(test: Test, a: str, b: str) -> float | None:
        if a not in results or b not in results:
            return None
        return speedup(test, results[a][test.key], results[b][test.key])

    names = ["ext4", "kEROFS", "fuse", "erofs", "fuse/ext4", "fuse/kEROFS", "erofs/kEROFS", "erofs/ext4"]
    print(f"\n{'test (cold page cache)':34}" + "".join(f"{n:>13}" for n in names))
    for test in TESTS:
        figures = [cell(results.get(c, {}).get(test.key), ".1f" if test.higher_is_better else ".3f")
                   for c in CONTENDERS]
        ratios = [cell(ratio(test, a, b), ".2f") for a, b in RATIOS]
        print(f"{test.label + ' (' + test.unit + ')':34}" + "".join(f"{v:>13}" for v in figures + ratios))
    print("ratios are speed ratios (x): >1 means faster than the baseline")
    for name, why in failures.items():
        print(f"{name}: not available: {why}")
    print("\ntargets:")
    for contender, baseline, floor, keys in TARGETS:
        for test in (t for t in TESTS if t.key in keys):
            value = ratio(test, contender, baseline)
            verdict = "n/a" if value is None else f"{value:.2f}x {'ok' if value >= floor else 'MISSED'}"
            print(f"  {contender} >= {floor}x {baseline} on {test.label}: {verdict}")
    print("anchors (nydus blog, 16 vCPU + NVMe, nydusd FUSE): 0.70x ext4 on buffered reads, 0.76x on random "
          "reads, 0.33x on tar; EROFS on loop 0.90x ext4 on reads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big-mb", type=int, default=512, help="size of the big file in MiB")
    parser.add_argument("--random-reads", type=int, default=20000, help="random 4 KiB reads per contender")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random read offsets")
    parser.add_argument("--runs", type=int, default=3, help="runs of each test per contender (median)")
    parser.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"],
                        help="blob compression (cached reads never decompress; it only changes the warm-up)")
    parser.add_argument("--warm-timeout", type=float, default=300.0, help="seconds allowed to fill the cache")
    parser.add_argument("--work-dir", help="parent of the scratch directory (default: system temp)")
    args = parser.parse_args()
    src = rootfs()
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-read-", dir=args.work_dir) as tmp:
        os.environ["LAZYFS_RUN_DIR"] = f"{tmp}/run"
        size = 4 * (args.big_mb << 20) + (3 << 29)  # tree, blob, export and cache copies of the big file + rootfs
        with ext4_dir(Path(tmp), size) as work:
            tree, boot, blobs, devices = make_image(src, work, args.big_mb, args.compressor)
            cache = work / "cache"
            contenders: dict[str, Callable[[], AbstractContextManager[Path]]] = {
                "ext4": lambda: contextlib.nullcontext(tree),
                "kernel EROFS": lambda: erofs_mount(boot, devices, work / "kernel-erofs"),
                "lazyfs fuse": lambda: lazyfs_contender("fuse", boot, blobs, cache, work / "fuse"),
                "lazyfs erofs": lambda: lazyfs_contender("erofs", boot, blobs, cache, work / "erofs"),
            }
            results: dict[str, dict[str, float]] = {}
            failures: dict[str, str] = {}
            try:
                warm_cache(boot, blobs, cache, work / "warm", args.warm_timeout)
            except MountError as exc:
                failures = {"lazyfs fuse": f"warming the cache failed: {exc}",
                            "lazyfs erofs": "the cache could not be warmed"}
            for name, contender in contenders.items():
                if name in failures:
                    continue
                try:
                    with contender() as root:
                        results[name] = measure(root, args)
                except (MountError, OSError, subprocess.CalledProcessError) as exc:
                    if not name.startswith("lazyfs"):
                        raise
                    failures[name] = str(exc).strip().splitlines()[-1]
            report(results, failures)


if __name__ == "__main__":
    main()
