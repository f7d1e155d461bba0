#!/usr/bin/env bash
# Make (once) a minimal Debian bookworm root with python3, for tests, benchmarks and the demo.
# Usage: scripts/debian-rootfs.sh DIR   (DIR is left untouched when it already holds a root)
set -euo pipefail
dest=${1:?usage: debian-rootfs.sh DIR}
if [ -x "$dest/usr/bin/python3" ]; then exit 0; fi
# Use the mirror this machine's apt is configured with: no network address is hard-coded here.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in apt sources" >&2; exit 1; }
tmp="$dest.partial"
mkdir -p "$(dirname "$dest")"
rm -rf "$tmp"
debootstrap --variant=minbase --include=python3 bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 \
  || { tail -20 "$tmp.log" >&2; exit 1; }
rm -rf "$dest" && mv "$tmp" "$dest" && rm -f "$tmp.log"
