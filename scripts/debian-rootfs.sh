#!/usr/bin/env bash
# Make (once) a minimal Debian bookworm root with some packages (default python3), for tests, benchmarks
# and the demo.
# Usage: scripts/debian-rootfs.sh DIR [PACKAGE...]
#   DIR is left untouched when it already holds a root with every PACKAGE installed; concurrent calls for
#   the same DIR wait for each other (lock DIR.lock) instead of building over one another.
set -euo pipefail
dest=${1:?usage: debian-rootfs.sh DIR [PACKAGE...]}
shift
packages=("${@:-python3}")
for pkg in "${packages[@]}"; do
  [[ $pkg =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || { echo "debian-rootfs.sh: bad package name '$pkg'" >&2; exit 2; }
done

# Every package installed in the root at $1 (its dpkg database says so).
complete() {
  local pkg
  for pkg in "${packages[@]}"; do
    [ "$(dpkg-query --admindir="$1/var/lib/dpkg" -W -f '${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] \
      || return 1
  done
}
complete "$dest" && exit 0
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9
complete "$dest" && exit 0  # made while we waited

# Use the mirror this machine's apt is configured with: no network address is hard-coded here.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in apt sources" >&2; exit 1; }
tmp="$dest.partial"
rm -rf "$tmp"
include=$(IFS=,; printf '%s' "${packages[*]}")
debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 \
  || { tail -20 "$tmp.log" >&2; exit 1; }
rm -rf "$dest" && mv "$tmp" "$dest" && rm -f "$tmp.log"
