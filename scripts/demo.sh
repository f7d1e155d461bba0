#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine.
#  1. start a private docker-registry on 127.0.0.1;
#  2. build an OCI image (Debian bookworm root + an app layer) with umoci and push it with skopeo;
#  3. convert it to a Nydus image with `lazyfs convert` and inspect it in the registry;
#  4. mount its merged bootstrap with the kernel EROFS driver over `lazyfs export` devices and run the
#     image's python3 from that mount.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LAZYFS=".venv/bin/lazyfs"
ROOTFS=${ROOTFS:-/var/cache/lazyfs/rootfs-bookworm}
work=$(mktemp -d /tmp/lazyfs-demo.XXXXXX)
registry_pid="" loop="" mnt="$work/mnt"

cleanup() {
  local rc=$?
  if mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt"; fi
  for l in $loop; do losetup -d "$l" 2>/dev/null || true; done
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }

scripts/debian-rootfs.sh "$ROOTFS"

step "starting docker-registry on 127.0.0.1"
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg="127.0.0.1:$port"
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $reg}
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done

step "building an OCI image: Debian bookworm root + app layer (umoci), pushing it (skopeo)"
umoci init --layout "$work/oci"
umoci new --image "$work/oci:demo"
umoci unpack --image "$work/oci:demo" "$work/bundle" >/dev/null
cp -a "$ROOTFS/." "$work/bundle/rootfs/"
umoci repack --image "$work/oci:demo" "$work/bundle"
rm -rf "$work/bundle"
umoci unpack --image "$work/oci:demo" "$work/bundle" >/dev/null  # a new bundle makes the next layer
mkdir -p "$work/bundle/rootfs/app"
cat > "$work/bundle/rootfs/app/hello.py" <<'APP'
import platform, sys
print(f"hello from a lazyfs Nydus image: Python {sys.version.split()[0]} on {platform.freedesktop_os_release()['PRETTY_NAME']}")
APP
rm -rf "$work/bundle/rootfs/usr/share/doc"
umoci repack --image "$work/oci:demo" "$work/bundle"
umoci config --image "$work/oci:demo" --config.cmd python3 --config.cmd /app/hello.py
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:demo" "docker://$reg/demo/debian:1"

step "lazyfs convert $reg/demo/debian:1 -> $reg/demo/debian:1-nydus"
t0=$(now)
$LAZYFS convert --plain-http "$reg/demo/debian:1" "$reg/demo/debian:1-nydus"
t1=$(now)
printf 'converted in %.1f s\n' "$(echo "$t1 - $t0" | bc -l)"

step "lazyfs inspect (straight from the registry)"
$LAZYFS inspect --plain-http "$reg/demo/debian:1-nydus" | sed -n 1,5p

step "kernel EROFS mount of the merged bootstrap over 'lazyfs export' devices"
skopeo copy -q --src-tls-verify=false "docker://$reg/demo/debian:1-nydus" "oci:$work/nydus:1"
blobs="$work/nydus/blobs/sha256"
boot_layer=$($PY - "$work/nydus" <<'PYEOF'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
manifest = json.load(open(f"{root}/blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
print(f"{root}/blobs/sha256/{manifest['layers'][-1]['digest'][7:]}")
PYEOF
)
tar -xzf "$boot_layer" -C "$work" image/image.boot
$LAZYFS export "$work/image/image.boot" --blob-dir "$blobs" --out "$work/export" > "$work/devices"
device_opts=""
for dev in $(cat "$work/devices"); do
  l=$(losetup -f --show -r "$dev"); loop="$loop $l"; device_opts="$device_opts,device=$l"
done
loop=${loop# }
mkdir -p "$mnt"
mount -t erofs -o "ro$device_opts" "$work/image/image.boot" "$mnt"
printf 'mounted: %s files\n' "$(find "$mnt" -type f | wc -l)"
chroot "$mnt" /usr/bin/python3 /app/hello.py
umount "$mnt"
for l in $loop; do losetup -d "$l"; done
loop=""

step "sizes in the registry"
$PY - "$work/oci" "$work/nydus" <<'PYEOF'
import json, sys
for root in sys.argv[1:]:
    index = json.load(open(f"{root}/index.json"))
    manifest = json.load(open(f"{root}/blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
    sizes = [layer["size"] for layer in manifest["layers"]]
    kind = "nydus" if "nydus" in root else "oci"
    print(f"{kind:6} layers: {len(sizes)}, total {sum(sizes) / 1e6:.1f} MB, last layer {sizes[-1] / 1e3:.1f} kB")
PYEOF
printf '\ndemo finished\n'
