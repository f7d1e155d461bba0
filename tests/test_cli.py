"""The `lazyfs` command line as a user runs it: build, inspect, merge, export, unpack, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_rafs_fixtures import V6_BOOT
from tests.walker import diff, snapshot


def lazyfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_every_command() -> None:
    out = lazyfs("--help").stdout
    for command in ("build", "merge", "inspect", "unpack", "export", "convert"):
        assert command in out
        assert "usage: lazyfs " + command in lazyfs(command, "--help").stdout


def test_build_inspect_merge_unpack(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "os-release").write_text("lower\n")
    (lower / "gone").write_text("x")
    (lower / "keep").write_text("kept")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "os-release").write_text("upper\n")
    (upper / ".wh.gone").touch()
    (tmp_path / "prefetch").write_text("/etc/os-release\n")
    blobs = tmp_path / "blobs"
    lazyfs("build", str(lower), "--bootstrap", str(tmp_path / "l.boot"), "--blob-dir", str(blobs),
           "--compressor", "lz4_block", "--digester", "sha256", "--chunk-size", "0x10000")
    lazyfs("build", str(upper), "--bootstrap", str(tmp_path / "u.boot"), "--blob-dir", str(blobs),
           "--compressor", "lz4_block", "--digester", "sha256", "--chunk-size", "65536",
           "--prefetch-list", str(tmp_path / "prefetch"))
    info = json.loads(lazyfs("inspect", "--json", str(tmp_path / "u.boot")).stdout)
    assert info["prefetch"] == ["/etc/os-release"] and info["chunk_size"] == 65536
    assert info["blobs"][0]["compressor"] == "lz4_block" and info["blobs"][0]["digester"] == "sha256"

    lazyfs("merge", str(tmp_path / "l.boot"), str(tmp_path / "u.boot"), "--bootstrap", str(tmp_path / "m.boot"))
    text = lazyfs("inspect", str(tmp_path / "m.boot")).stdout
    assert "2 blob(s)" in text and "/etc/os-release" in text and "/gone" not in text
    lazyfs("unpack", str(tmp_path / "m.boot"), "--blob-dir", str(blobs), str(tmp_path / "out"))
    assert (tmp_path / "out" / "etc" / "os-release").read_text() == "upper\n"
    assert (tmp_path / "out" / "keep").read_text() == "kept"
    assert not (tmp_path / "out" / "gone").exists() and not (tmp_path / "out" / ".wh.gone").exists()


def test_export_writes_blob_data(tmp_path: Path) -> None:
    blob_dir = V6_BOOT.parents[1] / "blobs"
    out = lazyfs("export", str(V6_BOOT), "--blob-dir", str(blob_dir), "--out", str(tmp_path)).stdout.split()
    data = Path(out[0])
    assert data.name.endswith(".blob.data") and data.stat().st_size == 36864
    lazyfs("unpack", str(V6_BOOT), "--blob-dir", str(blob_dir), str(tmp_path / "a"))
    assert (tmp_path / "a" / "lib.rs").read_bytes() == data.read_bytes()[:16931]


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"\0" * 8192)
    proc = lazyfs("inspect", str(bad), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("lazyfs inspect: ") and "Traceback" not in proc.stderr
    proc = lazyfs("unpack", str(V6_BOOT), "--blob-dir", str(tmp_path), str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr
    proc = lazyfs("build", str(tmp_path), "--bootstrap", "x", "--blob-dir", "y", "--chunk-size", "3000", check=False)
    assert proc.returncode == 2 and "chunk size" in proc.stderr


def test_unpack_round_trip_matches_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c").write_bytes(b"data" * 5000)
    (src / "link").symlink_to("a/b/c")
    lazyfs("build", str(src), "--bootstrap", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"))
    lazyfs("unpack", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"), str(tmp_path / "out"))
    assert diff(snapshot(src), snapshot(tmp_path / "out")) == []
