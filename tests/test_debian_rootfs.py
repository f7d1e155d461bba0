"""scripts/debian-rootfs.sh: which Debian roots it (re)builds, with a stand-in debootstrap (no network)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "debian-rootfs.sh"
# Records its arguments and makes a root whose dpkg database lists the --include packages as installed.
FAKE_DEBOOTSTRAP = """#!/bin/sh
echo "$@" >> "$FAKE_LOG"
include=$(printf '%s\\n' "$@" | sed -n 's/^--include=//p')
mkdir -p "$4/var/lib/dpkg/info" "$4/var/lib/dpkg/updates"
for pkg in $(echo "$include" | tr , ' '); do
  printf 'Package: %s\\nStatus: install ok installed\\nVersion: 1\\nArchitecture: amd64\\nMaintainer: x <x@x>\\n' "$pkg"
  printf 'Description: x\\n\\n'
done > "$4/var/lib/dpkg/status"
"""


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with the fake debootstrap first on PATH; also return the debootstrap calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "debootstrap"
    fake.write_text(FAKE_DEBOOTSTRAP)
    fake.chmod(0o755)
    log = tmp_path / "debootstrap.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log)}
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_builds_a_root_with_the_packages_once(tmp_path: Path) -> None:
    root = tmp_path / "rootfs-nginx"
    proc, calls = run_script(tmp_path, str(root), "nginx")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and calls[0].startswith("--variant=minbase --include=nginx bookworm ")
    assert "Package: nginx" in (root / "var/lib/dpkg/status").read_text()
    assert not root.with_name("rootfs-nginx.partial").exists()
    proc, calls = run_script(tmp_path, str(root), "nginx")
    assert proc.returncode == 0 and len(calls) == 1  # complete: left alone


def test_a_root_missing_a_package_is_rebuilt_with_all_of_them(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    assert run_script(tmp_path, str(root))[0].returncode == 0  # default: python3
    proc, calls = run_script(tmp_path, str(root), "python3", "nginx")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].split()[1] == "--include=python3" and calls[1].split()[1] == "--include=python3,nginx"
    assert "Package: nginx" in (root / "var/lib/dpkg/status").read_text()


def test_bad_package_names_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    proc, calls = run_script(tmp_path, str(root), "nginx;reboot")
    assert proc.returncode == 2 and "bad package name 'nginx;reboot'" in proc.stderr
    assert calls == [] and not root.exists()
