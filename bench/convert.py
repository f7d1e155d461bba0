"""Conversion speed and memory: `lazyfs build` of a Debian rootfs against `tar -c | zstd -3`.

Prints MB/s for both (measured in the same run, page cache warm for both) and their ratio, plus the
peak RSS of building from a generated 1 GiB layer tar (target: < 300 MB). Target ratio: >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import shlex
import tarfile
import tempfile
from pathlib import Path

from bench.common import LAZYFS, rootfs, run, tree_bytes


def make_layer_tar(path: Path, size: int) -> None:
    """A layer tar of *size* bytes of mixed compressible and random files, written streaming."""
    block = os.urandom(1 << 20)
    text = b"lazyfs benchmark line of fairly compressible text\n" * 20000
    with tarfile.open(path, "w") as tar:
        written, i = 0, 0
        while written < size:
            data = (block if i % 2 else text)[: min(1 << 20, size - written)]
            f = path.with_suffix(".part")
            f.write_bytes(data * 16)
            tar.add(f, arcname=f"data/file-{i:05d}")
            written += len(data) * 16
            i += 1
        f.unlink()


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
        print(f"layer tar of {layer.stat().st_size / 1e6:.0f} MB: {big.seconds:.1f} s, "
              f"peak RSS {big.peak_rss_mb:.0f} MB (target < 300 MB)")


if __name__ == "__main__":
    main()
