#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, everything private and always torn down.
#  1. start a private docker-registry on 127.0.0.1 (free port, access log kept for byte counts);
#  2. start the P2P daemons on 127.0.0.1: `lazyfs scheduler`, a seed peer (`lazyfs peer --seed`) and an ordinary
#     peer with its registry mirror (`lazyfs peer --proxy-port`), each with /metrics;
#  3. build an OCI image (debootstrap'd Debian bookworm root with python3 + a small app layer) with umoci,
#     push it with skopeo, convert it to a Nydus image with `lazyfs convert`;
#  4. start `lazyfs snapshotter` (backend p2p: mounts fetch chunks through the peer's mirror) and a private
#     containerd registering it (`lazyfs setup containerd`);
#  5. cold start through overlayfs: `ctr image pull` + `ctr run --snapshotter overlayfs` (straight from the registry);
#  6. cold start through lazyfs: `lazyfs image pull` + `ctr run --snapshotter lazyfs`;
#  7. print the comparison: pull, run and total seconds, bytes served by the registry, and where lazyfs's bytes
#     came from (registry access log: data blobs or the rest; the peers' /metrics).
# Nothing outside a fresh /tmp/lzdemo.* directory is used except containerd's and runc's fixed paths
# (/run/containerd/runc/NS, /run/containerd/s, the NS cgroups), which are cleaned up as well.
# Environment: ROOTFS (Debian root, made once), LAZYFS_DEMO_MODE (fuse | erofs: the snapshotter's mount mode),
# LAZYFS_DEMO_LOGS (a directory that receives the registry, P2P, containerd and snapshotter logs at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY="$repo/.venv/bin/python"
LAZYFS="$repo/.venv/bin/lazyfs"
ROOTFS=${ROOTFS:-/var/cache/lazyfs/rootfs-bookworm}
MODE=${LAZYFS_DEMO_MODE:-fuse}
export PATH="$PATH:/usr/sbin:/sbin"

work=$(mktemp -d /tmp/lzdemo.XXXXXX)  # short: unix socket paths live here
id=${work##*.}
ns="lazyfs-demo-$id"                   # containerd namespace (runc keeps state in /run/containerd/runc/NS)
export LAZYFS_RUN_DIR="$work/run"      # mount daemons of our snapshotter register here, and only here
ctr_sock="$work/containerd.sock"
snap_sock="$work/snapshotter.sock"
registry_pid="" scheduler_pid="" seed_pid="" peer_pid="" snapshotter_pid="" containerd_pid=""
# The daemons run in their own sessions (setsid): a Ctrl-C reaches this script and the command in the
# foreground, and cleanup stops the daemons in order.

log() { printf '%s\n' "$*" >&2; }
# Stop a process we started: SIGTERM, then SIGKILL after $2 seconds.
stop_pid() {
  local pid=$1 grace=${2:-10} i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# Mount points at or below $work, deepest first.
mounts_under_work() {
  awk -v w="$work" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

cleanup() {
  local rc=$? pid p f mp loop back
  set +e
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
    for f in scheduler seed peer snapshotter containerd; do
      [ -s "$work/$f.log" ] && { log "--- $f log (tail):"; tail -15 "$work/$f.log" >&2; }
    done
  fi
  if [ -n "${LAZYFS_DEMO_LOGS:-}" ]; then mkdir -p "$LAZYFS_DEMO_LOGS" && cp "$work"/*.log "$LAZYFS_DEMO_LOGS"/ 2>/dev/null; fi
  if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
    for t in $(timeout 20 ctr -a "$ctr_sock" -n "$ns" tasks ls -q 2>/dev/null); do
      timeout 20 ctr -a "$ctr_sock" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1
      timeout 20 ctr -a "$ctr_sock" -n "$ns" tasks delete --force "$t" >/dev/null 2>&1
    done
    for c in $(timeout 20 ctr -a "$ctr_sock" -n "$ns" containers ls -q 2>/dev/null); do
      timeout 20 ctr -a "$ctr_sock" -n "$ns" containers delete "$c" >/dev/null 2>&1
    done
  fi
  stop_pid "$containerd_pid"
  # Shims of our containerd (they name its socket on their command line) that outlived it.
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    if tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF -- "$ctr_sock"; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
  done
  # A killed shim leaves its socket, /run/containerd/s/sha256(ADDRESS/NS/ID), behind.
  for c in "overlayfs-$id" "lazyfs-$id"; do
    rm -f "/run/containerd/s/$(printf '%s' "$ctr_sock/$ns/$c" | sha256sum | cut -d' ' -f1)"
  done
  if [ -d "/run/containerd/runc/$ns" ]; then
    for c in /run/containerd/runc/"$ns"/*/; do
      [ -d "$c" ] && timeout 20 runc --root "/run/containerd/runc/$ns" delete --force "$(basename "$c")" >/dev/null 2>&1
    done
    rm -rf "/run/containerd/runc/$ns"
  fi
  for d in /sys/fs/cgroup/*/"$ns" /sys/fs/cgroup/"$ns"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  stop_pid "$snapshotter_pid"
  # Image mounts are separate daemons that outlive the snapshotter: unmount them and stop their daemons.
  for f in "$LAZYFS_RUN_DIR"/mounts/*/mount.json; do
    [ -f "$f" ] || continue
    read -r mp pid < <("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["mountpoint"], r["pid"])' "$f")
    timeout 30 "$LAZYFS" umount "$mp" >/dev/null 2>&1 || log "lazyfs umount $mp failed"
    stop_pid "$pid" 5
  done
  for mp in $(mounts_under_work); do umount -l "$mp" 2>/dev/null; done
  while read -r loop back; do
    case "$back" in "$work"/*) losetup -d "$loop" 2>/dev/null ;; esac
  done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null)
  stop_pid "$peer_pid"
  stop_pid "$seed_pid"
  stop_pid "$scheduler_pid"
  stop_pid "$registry_pid"
  if [ -z "$(mounts_under_work)" ]; then rm -rf "$work"; else log "left $work: still mounted"; fi
  [ "$rc" -eq 0 ] || log "demo failed (exit status $rc); everything it started is stopped"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n== %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
# Wait until the unix socket $1 accepts connections; fail with log $3 if process $2 dies or 30 s pass.
wait_socket() {
  local i
  for ((i = 0; i < 300; i++)); do
    "$PY" -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  log "$(basename "$1") did not come up (log: $3)"; return 1
}
# Wait until log $1 matches the extended regex $2; fail if process $3 dies or 30 s pass.
wait_log() {
  local i
  for ((i = 0; i < 300; i++)); do
    grep -Eq -- "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  log "$(basename "$1" .log) did not come up (log: $1)"; tail -15 "$1" >&2; return 1
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Registry access-log lines so far, and the bytes (and requests) it served after line $1 (only for request
# lines matching the extended regex $2, when given).
access_lines() { grep -c '^[0-9.]* - - \[' "$work/registry.log" || true; }
served() {
  grep '^[0-9.]* - - \[' "$work/registry.log" | tail -n +"$(($1 + 1))" | awk -F'"' -v re="${2-}" \
    '$2 ~ re {split($3, a, " "); b += (a[2] == "-" ? 0 : a[2]); n++} END {printf "%d %d\n", b, n}'
}
# Sum of the samples of counter $2 on the /metrics port $1 of a peer (0 when it has none).
metric() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 {s += $2} END {printf "%d\n", s}'
}
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }
# Sum of the layer sizes of image $1 in the registry (its manifest), the number of layers, the last layer's size
# and the digests of the others, joined by |.
image_size() {
  "$PY" - "$reg" "$1" <<'PYEOF'
import json, sys, urllib.request
reg, ref = sys.argv[1], sys.argv[2]
repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
req = urllib.request.Request(f"http://{reg}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
layers = json.load(urllib.request.urlopen(req))["layers"]
print(sum(layer["size"] for layer in layers), len(layers), layers[-1]["size"], "|".join(layer["digest"] for layer in layers[:-1]))
PYEOF
}

demo_start=$(now)
step "Debian bookworm root with python3 (debootstrap, made once: $ROOTFS)"
scripts/debian-rootfs.sh "$ROOTFS"
printf 'root: %s\n' "$(du -sh "$ROOTFS" | cut -f1)"

step "starting docker-registry on 127.0.0.1"
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg="127.0.0.1:$port"
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $reg, secret: lazyfs-demo-$id}
YML
setsid docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$reg/v2/" >/dev/null || { tail "$work/registry.log" >&2; exit 1; }
printf 'registry: http://%s (data in %s)\n' "$reg" "$work/registry"

step "starting the P2P daemons on 127.0.0.1: scheduler, seed peer, peer with its registry mirror"
# Everything is on 127.0.0.1 and a seed answers in milliseconds here: look for parents every 50 ms, not every
# 500 (Dragonfly's default for real networks), and send a peer that found none to the origin after 0.5 s, not 2.
cat > "$work/scheduler.toml" <<TOML
retry_interval = 0.05
retry_back_to_source_limit = 10
retry_limit = 20
TOML
show "lazyfs scheduler --listen 127.0.0.1:0 --config $work/scheduler.toml"
sed 's/^/  /' "$work/scheduler.toml"
setsid "$LAZYFS" scheduler --listen 127.0.0.1:0 --config "$work/scheduler.toml" > "$work/scheduler.log" 2>&1 &
scheduler_pid=$!
wait_log "$work/scheduler.log" 'scheduler_started .*port=[0-9]+' "$scheduler_pid"
sched="127.0.0.1:$(grep -Eo 'scheduler_started .*port=[0-9]+' "$work/scheduler.log" | head -1 | sed 's/.*port=//')"
# Start peer $1 (seed or peer) with metrics on port $2, then the extra options; its pid goes to ${1}_pid.
start_peer() {
  local name=$1 metrics=$2
  shift 2
  local args=(peer --scheduler "$sched" --hostname "lzdemo-$name" --data-dir "$work/$name" --socket "$work/$name.sock"
              --ip 127.0.0.1 --listen 127.0.0.1 --grpc-port 0 --vortex-port 0 --metrics-port "$metrics" "$@")
  show "lazyfs ${args[*]}"
  setsid "$LAZYFS" "${args[@]}" > "$work/$name.log" 2>&1 &
  printf -v "${name}_pid" '%s' "$!"
}
seed_metrics=$(free_port)
start_peer seed "$seed_metrics" --seed
peer_metrics=$(free_port) proxy_port=$(free_port)
start_peer peer "$peer_metrics" --proxy-port "$proxy_port"
wait_log "$work/seed.log" 'peer ready ' "$seed_pid"
wait_log "$work/peer.log" 'peer ready ' "$peer_pid"
peer_proxy="http://127.0.0.1:$proxy_port"
printf 'scheduler %s; seed peer metrics :%s; peer metrics :%s, registry mirror %s\n' "$sched" "$seed_metrics" \
  "$peer_metrics" "$peer_proxy"

step "building the OCI image: Debian root layer + app layer (umoci), pushing it (skopeo)"
oci_ref="$reg/demo/hello:1" nydus_ref="$reg/demo/hello:1-nydus"
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
print(f"hello from lazyfs: Python {sys.version.split()[0]} on {platform.freedesktop_os_release()['PRETTY_NAME']}")
APP
umoci repack --image "$work/oci:demo" "$work/bundle"
rm -rf "$work/bundle"
umoci config --image "$work/oci:demo" --config.cmd python3 --config.cmd /app/hello.py
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:demo" "docker://$oci_ref"
read -r oci_bytes oci_layers _ < <(image_size "$oci_ref")
printf 'pushed %s: %d layers, %s (gzip), app: python3 /app/hello.py\n' "$oci_ref" "$oci_layers" "$(mb "$oci_bytes")"

step "lazyfs convert $oci_ref -> $nydus_ref"
show "lazyfs convert --plain-http $oci_ref $nydus_ref"
mkdir -p "$work/convert"
t0=$(now)
"$LAZYFS" convert --plain-http --work-dir "$work/convert" "$oci_ref" "$nydus_ref" > "$work/convert.log" 2>&1 \
  || { tail -20 "$work/convert.log" >&2; exit 1; }
t1=$(now)
grep '^manifest:' "$work/convert.log" || true
read -r nydus_bytes nydus_layers boot_bytes data_blobs < <(image_size "$nydus_ref")
printf 'converted in %s s: %d data blobs + bootstrap layer (%s), %s in all\n' "$(secs "$t0" "$t1")" \
  "$((nydus_layers - 1))" "$(mb "$boot_bytes")" "$(mb "$nydus_bytes")"

step "starting lazyfs snapshotter ($MODE mode, chunks through the peer) and a private containerd that registers it"
cat > "$work/snapshotter.toml" <<TOML
[lazyfs]
mode = "$MODE"
cache_dir = "$work/cache"
plain_http = ["127.0.0.1"]
backend = "p2p"
peer_proxy = "$peer_proxy"
TOML
sed 's/^/  /' "$work/snapshotter.toml"
setsid "$LAZYFS" snapshotter --address "$snap_sock" --root "$work/snapshotter" --config "$work/snapshotter.toml" \
  > "$work/snapshotter.log" 2>&1 &
snapshotter_pid=$!
wait_socket "$snap_sock" "$snapshotter_pid" "$work/snapshotter.log"
printf 'snapshotter: %s (root %s, cache %s, chunks through %s)\n' "$snap_sock" "$work/snapshotter" "$work/cache" \
  "$peer_proxy"
# containerd's own paths private; CRI off (ctr needs none of it); then lazyfs adds its proxy plugin.
cat > "$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd-root"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$ctr_sock"

[ttrpc]
  address = "$ctr_sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$work/opt"
TOML
show "lazyfs setup containerd --config $work/containerd.toml --address $snap_sock"
"$LAZYFS" setup containerd --config "$work/containerd.toml" --address "$snap_sock"
sed -n '/^\[proxy_plugins/,/^$/p' "$work/containerd.toml" | sed '/^$/d'
setsid containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
containerd_pid=$!
wait_socket "$ctr_sock" "$containerd_pid" "$work/containerd.log"
printf 'containerd: %s, namespace %s (below, "ctr" means ctr -a %s)\n' "$ctr_sock" "$ns" "$ctr_sock"
ctr -a "$ctr_sock" plugins ls | awk 'NR == 1 || /snapshotter.v1 +(overlayfs|lazyfs) /' | sed 's/ *$//'
CTR=(ctr -a "$ctr_sock" -n "$ns")
app=(python3 /app/hello.py)

step "cold start through overlayfs: ctr image pull + ctr run --snapshotter overlayfs"
mark=$(access_lines)
show "ctr -n $ns image pull --plain-http --snapshotter overlayfs $oci_ref"
t0=$(now)
"${CTR[@]}" image pull --plain-http --snapshotter overlayfs "$oci_ref" > "$work/pull-oci.log" 2>&1 \
  || { tail -20 "$work/pull-oci.log" >&2; exit 1; }
t1=$(now)
tr '\r' '\n' < "$work/pull-oci.log" | grep -E '^(unpacking|done)' | tail -2 | sed 's/[[:space:]]*$//' || true
show "ctr -n $ns run --rm --snapshotter overlayfs $oci_ref overlayfs-$id ${app[*]}"
"${CTR[@]}" run --rm --snapshotter overlayfs "$oci_ref" "overlayfs-$id" "${app[@]}"
t2=$(now)
read -r ovl_bytes ovl_requests < <(served "$mark")
ovl_pull=$(secs "$t0" "$t1") ovl_run=$(secs "$t1" "$t2") ovl_total=$(secs "$t0" "$t2")
printf 'pull %s s, run %s s, total %s s; registry served %s in %d requests\n' \
  "$ovl_pull" "$ovl_run" "$ovl_total" "$(mb "$ovl_bytes")" "$ovl_requests"

step "cold start through lazyfs: lazyfs image pull + ctr run --snapshotter lazyfs"
mark=$(access_lines)
show "lazyfs image pull --plain-http --address $ctr_sock --namespace $ns $nydus_ref"
t0=$(now)
"$LAZYFS" image pull --plain-http --address "$ctr_sock" --namespace "$ns" "$nydus_ref" > "$work/pull-nydus.log" 2>&1 \
  || { tail -20 "$work/pull-nydus.log" >&2; exit 1; }
t1=$(now)
tail -1 "$work/pull-nydus.log"
show "ctr -n $ns run --rm --snapshotter lazyfs $nydus_ref lazyfs-$id ${app[*]}"
"${CTR[@]}" run --rm --snapshotter lazyfs "$nydus_ref" "lazyfs-$id" "${app[@]}"
t2=$(now)
read -r lz_bytes lz_requests < <(served "$mark")
read -r lz_source _ < <(served "$mark" "/blobs/($data_blobs) ")  # the data blobs: only peers fetch them
seed_source=$(metric "$seed_metrics" lazyfs_peer_source_bytes_total)
seed_upload=$(metric "$seed_metrics" lazyfs_peer_upload_bytes_total)
peer_source=$(metric "$peer_metrics" lazyfs_peer_source_bytes_total)
peer_from_seed=$(metric "$peer_metrics" lazyfs_peer_seed_bytes_total)
peer_proxied=$(metric "$peer_metrics" lazyfs_peer_proxy_p2p_bytes_total)
lz_pull=$(secs "$t0" "$t1") lz_run=$(secs "$t1" "$t2") lz_total=$(secs "$t0" "$t2")
lz_fetched=$("$LAZYFS" status --json | "$PY" -c 'import json,sys; print(sum(m.get("bytes_fetched") or 0 for m in json.load(sys.stdin)))')
printf 'pull %s s, run %s s, total %s s; registry served %s in %d requests\n' \
  "$lz_pull" "$lz_run" "$lz_total" "$(mb "$lz_bytes")" "$lz_requests"
show "lazyfs status"
"$LAZYFS" status
show "lazyfs tasks --socket $work/peer.sock"
"$LAZYFS" tasks --socket "$work/peer.sock"

step "comparison (cold starts, registry on 127.0.0.1 without a bandwidth limit)"
"$PY" - <<PYEOF
rows = [("overlayfs (OCI image)", $ovl_pull, $ovl_run, $ovl_total, $ovl_bytes),
        ("lazyfs (Nydus image)", $lz_pull, $lz_run, $lz_total, $lz_bytes)]
print(f"{'':24}{'pull s':>9}{'run s':>9}{'total s':>9}{'from registry':>16}")
for name, pull, run, total, served in rows:
    print(f"{name:24}{pull:9.2f}{run:9.2f}{total:9.2f}{served / 1e6:13.1f} MB")
(_, op, orun, ot, ob), (_, lp, lrun, lt, lb) = rows
print(f"{'overlayfs / lazyfs':24}{op / lp:8.1f}x{orun / lrun:8.1f}x{ot / lt:8.1f}x{ob / lb:15.1f}x")
fetched, boot, nydus, oci = $lz_fetched, $boot_bytes, $nydus_bytes, $oci_bytes
print()
print(f"image in the registry: OCI {oci / 1e6:.1f} MB, Nydus {nydus / 1e6:.1f} MB (bootstrap layer {boot / 1e6:.2f} MB)")
print(f"lazyfs fetched {fetched / 1e6:.1f} MB of blob data (lazyfs status) + {boot / 1e6:.2f} MB bootstrap layer"
      f" = {(fetched + boot) / 1e6:.1f} MB = {100 * (fetched + boot) / nydus:.1f}% of the Nydus image")
print()
print("where lazyfs's bytes came from (registry access log: data blobs or the rest; the peers' /metrics):")
seed_source, peer_source, seed_upload = $seed_source, $peer_source, $seed_upload
lz_bytes, lz_source = $lz_bytes, $lz_source
paths = [("registry -> lazyfs image pull (manifest, config, bootstrap layer)", lz_bytes - lz_source),
         (f"registry -> back to source (seed {seed_source / 1e6:.1f} MB, peer {peer_source / 1e6:.1f} MB)", lz_source),
         (f"seed peer -> peer, P2P pieces (seed uploaded {seed_upload / 1e6:.1f} MB)", $peer_from_seed),
         ("peer's registry mirror -> lazyfs mount", $peer_proxied)]
for what, n in paths:
    print(f"  {what:70}{n / 1e6:8.1f} MB")
rate = 100e6 / 8
print(f"(no bandwidth limit here; at 100 Mbit/s moving these bytes alone would take {ob / rate:.1f} s for overlayfs"
      f" and {lb / rate:.1f} s for lazyfs: bench/cold_start.py measures that)")
PYEOF
printf '\ndemo finished in %s s; tearing down\n' "$(secs "$demo_start" "$(now)")"
