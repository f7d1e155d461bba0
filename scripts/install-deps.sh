#!/usr/bin/env bash
# Install the Debian packages lazyfs needs, only those missing. Idempotent; needs root.
set -euo pipefail
packages=(
  fuse3 libfuse3-dev pkg-config      # FUSE mounts (pyfuse3 builds against libfuse3)
  docker-registry skopeo umoci       # local origin registry and OCI image tools for tests
  busybox-static debootstrap         # test images
  erofs-utils zstd                   # independent EROFS reader; zstd CLI for the conversion baseline
  iproute2 util-linux attr time      # namespaces, loop devices, xattr tools, GNU time for benchmarks
  containerd runc                    # container runtime integration
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
