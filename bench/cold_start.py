"""Cold container start, HelloBench style: overlayfs (plain pull, then run) against lazyfs (lazy pull, then run).

Images are made from Debian roots (debootstrap): `python` runs ``python3 -c 'print(1)'`` in the python3 root;
`httpd` serves with ``python3 -m http.server`` and `nginx` runs nginx in the foreground in the nginx root (for
both, ready = first HTTP 200 on the host network); `big` is the python image plus ~770 MB of filler (about 1 GB
of files). They sit in a docker-registry inside a network namespace whose veth egress is
tc-limited (tbf), reached by a private containerd 1.6 + `lazyfs snapshotter` over plain HTTP.

Every measured run is cold: image removed from containerd (sync GC), lazyfs cache emptied, snapshotter
restarted, kernel caches dropped. E2E overlayfs = ``ctr image pull`` + ``ctr run --snapshotter overlayfs``;
E2E lazyfs = ``lazyfs image pull`` + ``ctr run --snapshotter lazyfs``, until ready. Bytes fetched come from
the registry's access log. T_warm is the same pull + run right after, with everything cached locally, and
the bound is T_warm + bytes_fetched / B. Medians over the runs; JSON via ``--json``, PNG via ``--png``.

``--optimize`` measures workload-optimized Nydus images instead (as estargz's optimize and Nydus's prefetch
lists do): each case runs once on lazyfs, ``lazyfs trace`` lists the files it opened, and ``lazyfs convert
--prefetch-list`` converts the image again with them in its prefetch table, fetched right after mount.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from bench.common import LAZYFS, ROOT, drop_caches, nginx_rootfs, pyplot, rootfs, run
from bench.convert import make_layer_tar, push_layer_image
from bench.lazy_read import pull_all
from tests.containerd_fixtures import Containerd, SnapshotterProcess, unmount_all_under
from tests.hosts import NetnsRegistry, tc_limit, tc_unlimit
from tests.registry_fixtures import REGISTRY_BIN, RegistryServer, free_port

PORT = 5000
NGINX_CONF = "etc/nginx/lazyfs-bench.conf"  # added to the nginx image: foreground, the port, the stock page
NGINX_CONF_TEXT = """daemon off;
worker_processes 1;
error_log stderr;
pid /run/nginx-bench.pid;
events {{ worker_connections 64; }}
http {{
    include /etc/nginx/mime.types;
    access_log off;
    server {{ listen 127.0.0.1:{port}; root /usr/share/nginx/html; }}
}}
"""
READY_TIMEOUT = 600.0
SPEEDUP_TARGETS = {"python": 3.0, "big": 10.0}  # E2E overlayfs / E2E lazyfs at 100 Mbit/s (issue 6)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured workload: an image, its ready rule and the link rate."""

    name: str
    image: str  # key of the built image
    rate_mbit: int
    command: tuple[str, ...]  # "{port}" stands for the HTTP port of this benchmark run
    http: bool = False  # ready = first HTTP 200 on that port (host network), not the command's exit

    def argv(self, port: int) -> list[str]:
        """The command, for a server listening on *port*."""
        return [arg.replace("{port}", str(port)) for arg in self.command]

    @property
    def bandwidth(self) -> float:
        """Link bandwidth in bytes per second (tc's mbit is 10^6 bit)."""
        return self.rate_mbit * 1e6 / 8


PRINT = ("python3", "-c", "print(1)")
CASES = {c.name: c for c in (
    Case("python", "python", 100, PRINT),
    Case("httpd", "python", 100, ("python3", "-m", "http.server", "{port}"), http=True),
    Case("nginx", "nginx", 100, ("nginx", "-c", f"/{NGINX_CONF}"), http=True),
    Case("big", "big", 100, PRINT),
    Case("python-3MBps", "python", 24, PRINT),
)}


@dataclasses.dataclass(frozen=True)
class Link:
    """A network namespace joined to the host by a veth pair; the registry lives at ``ns_addr``."""

    netns: str
    ns_veth: str
    ns_addr: str

    def shape(self, rate_mbit: int) -> None:
        """Limit the namespace's egress (registry -> host) to *rate_mbit* with a token bucket."""
        tc_limit(["ip", "netns", "exec", self.netns], self.ns_veth, rate_mbit)

    def unshape(self) -> None:
        """Remove the limit (used while the images are set up)."""
        tc_unlimit(["ip", "netns", "exec", self.netns], self.ns_veth)


@contextlib.contextmanager
def namespace_link() -> Iterator[Link]:
    """A fresh ``lzbench-<rand>`` namespace and veth pair in a free 10.213.x.0/30; deleted on exit."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    octet = next(x for x in (secrets.randbelow(250) + 1 for _ in range(100)) if f" 10.213.{x}." not in used)
    tag = secrets.token_hex(3)
    netns, host_veth, ns_veth = f"lzbench-{tag}", f"lzb{tag}h", f"lzb{tag}n"
    host_addr, ns_addr = f"10.213.{octet}.1", f"10.213.{octet}.2"
    steps = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host_veth, "type", "veth", "peer", "name", ns_veth, "netns", netns],
        ["ip", "addr", "add", f"{host_addr}/30", "dev", host_veth],
        ["ip", "link", "set", host_veth, "up"],
        ["ip", "-n", netns, "addr", "add", f"{ns_addr}/30", "dev", ns_veth],
        ["ip", "-n", netns, "link", "set", ns_veth, "up"],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield Link(netns, ns_veth, ns_addr)
    finally:
        subprocess.run(["ip", "link", "del", host_veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


@contextlib.contextmanager
def namespace_registry(workdir: Path, link: Link) -> Iterator[RegistryServer]:
    """docker-registry with filesystem storage under *workdir*, listening on the namespace address."""
    if REGISTRY_BIN is None:
        raise SystemExit("docker-registry is not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True)
    host = f"{link.ns_addr}:{PORT}"
    config = workdir / "config.yml"
    config.write_text(json.dumps({
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": host, "secret": uuid.uuid4().hex},
    }))
    server = NetnsRegistry(host, workdir / "storage", workdir / "registry.log", None, config,
                           prefix=["ip", "netns", "exec", link.netns])
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclasses.dataclass(frozen=True)
class Image:
    """An image pushed twice: as plain OCI (gzip) and converted to Nydus."""

    oci: str
    nydus: str
    oci_bytes: int
    nydus_bytes: int


def image_layer(name: str, layer: Path, http_port: int) -> None:
    """Write the one layer tar of image *name*: its Debian root, plus the filler (big) or config (nginx, serving
    on *http_port*)."""
    root = nginx_rootfs() if name == "nginx" else rootfs()
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(layer), "."], check=True)
    if name == "big":
        filler = layer.with_name("filler.tar")
        make_layer_tar(filler, 770 << 20)
        subprocess.run(["tar", "-A", "-f", str(layer), str(filler)], check=True)
        filler.unlink()
    elif name == "nginx":
        extra = layer.with_name("nginx-extra")
        (extra / NGINX_CONF).parent.mkdir(parents=True)
        (extra / NGINX_CONF).write_text(NGINX_CONF_TEXT.format(port=http_port))
        subprocess.run(["tar", "-C", str(extra), "--numeric-owner", "--owner=0", "--group=0", "-rf", str(layer),
                        NGINX_CONF], check=True)
        shutil.rmtree(extra)


def build_images(names: set[str], work: Path, registry: RegistryServer, http_port: int) -> dict[str, Image]:
    """Push each image in *names* as a one-layer OCI image, convert it with `lazyfs convert`, size both."""
    images = {}
    for name in sorted(names):
        layer = work / f"{name}.tar"
        image_layer(name, layer, http_port)
        oci = trio.run(push_layer_image, registry.host, layer, f"bench/{name}")
        layer.unlink()
        layer.with_suffix(".tar.gz").unlink()
        nydus = f"{registry.host}/bench/{name}-nydus:1"
        conv = run([*LAZYFS, "convert", "--plain-http", oci, nydus])
        oci_bytes = pull_all(registry.host, f"bench/{name}", "1")[1]
        nydus_bytes = pull_all(registry.host, f"bench/{name}-nydus", "1")[1]
        print(f"image {name}: OCI {oci_bytes / 1e6:.1f} MB, Nydus {nydus_bytes / 1e6:.1f} MB "
              f"(convert {conv.seconds:.1f} s)", flush=True)
        images[name] = Image(oci, nydus, oci_bytes, nydus_bytes)
    return images


class Bench:
    """The private containerd + snapshotter and the per-run steps."""

    def __init__(self, containerd: Containerd, cache: Path, registry: RegistryServer, http_port: int) -> None:
        self.containerd, self.cache, self.registry, self.http_port = containerd, cache, registry, http_port

    def reset(self) -> None:
        """Make the next run cold: images removed (sync GC), lazyfs cache emptied, snapshotter restarted,
        kernel caches dropped."""
        ctr = self.containerd.ctr
        for ref in ctr("images", "ls", "-q").stdout.split():
            ctr("images", "rm", "--sync", ref)
        leftover = ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.splitlines()[1:]
        if leftover:
            raise RuntimeError(f"lazyfs snapshots left after image removal: {leftover}")
        self.containerd.snapshotter.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.containerd.snapshotter.start()
        drop_caches()

    def pull_and_run(self, case: Case, snapshotter: str, ref: str) -> float:
        """Seconds for the pull plus the run of *case* until ready."""
        ctr = self.containerd.ctr
        if case.http:
            refuse_answering_port(self.http_port)
        start = time.perf_counter()
        if snapshotter == "overlayfs":
            ctr("image", "pull", "--plain-http", ref, timeout=READY_TIMEOUT)
        else:
            subprocess.run([*LAZYFS, "image", "pull", "--plain-http", "--address", str(self.containerd.address),
                            "--namespace", self.containerd.namespace, "--snapshotter", "lazyfs", ref], cwd=ROOT,
                           check=True, capture_output=True, timeout=READY_TIMEOUT)
        name = f"cs-{secrets.token_hex(4)}"
        if not case.http:
            out = ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, *case.argv(self.http_port),
                      timeout=READY_TIMEOUT)
            if out.stdout.strip() != "1":
                raise RuntimeError(f"unexpected output of {case.command}: {out.stdout!r}")
            return time.perf_counter() - start
        ctr("run", "-d", "--net-host", "--snapshotter", snapshotter, ref, name, *case.argv(self.http_port))
        try:
            wait_http_ok(f"http://127.0.0.1:{self.http_port}/")
            return time.perf_counter() - start
        finally:
            ctr("tasks", "kill", "-s", "KILL", name, check=False)
            ctr("tasks", "delete", "--force", name, check=False)
            ctr("containers", "delete", name, check=False)

    def measure(self, case: Case, snapshotter: str, ref: str) -> dict[str, float]:
        """One cold run and the warm repeat: E2E and warm seconds, registry bytes of the cold run."""
        self.reset()
        before = self.registry.bytes_served("/v2/")
        e2e = self.pull_and_run(case, snapshotter, ref)
        fetched = self.registry.bytes_served("/v2/") - before
        warm = self.pull_and_run(case, snapshotter, ref)
        return {"e2e_s": e2e, "warm_s": warm, "fetched_bytes": fetched,
                "bound_s": warm + fetched / case.bandwidth}


def refuse_answering_port(port: int) -> None:
    """Fail when something already listens on 127.0.0.1:*port*: it, not the container, would answer."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} already answers before the container starts; rerun to pick another")


def optimize(bench: Bench, case: Case, image: Image, run_dir: Path) -> Image:
    """*image* converted again with the files *case* opens on lazyfs (``lazyfs trace``) as its prefetch list."""
    bench.reset()
    bench.pull_and_run(case, "lazyfs", image.nydus)  # the image mount outlives the container
    env = {**os.environ, "LAZYFS_RUN_DIR": str(run_dir)}
    status = json.loads(subprocess.run([*LAZYFS, "status", "--json"], env=env, cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    (mount,) = [m for m in status if m["state"] == "running"]
    files = subprocess.run([*LAZYFS, "trace", mount["mountpoint"]], env=env, cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
    listing = run_dir.parent / f"{case.name}.prefetch"
    listing.write_text(files)
    host, repo = bench.registry.host, f"bench/{case.name}-nydus-opt"
    run([*LAZYFS, "convert", "--plain-http", "--prefetch-list", str(listing), image.oci, f"{host}/{repo}:1"])
    size = pull_all(host, repo, "1")[1]
    print(f"image {case.image} optimized for {case.name}: {len(files.splitlines())} files in the prefetch list, "
          f"Nydus {size / 1e6:.1f} MB", flush=True)
    return dataclasses.replace(image, nydus=f"{host}/{repo}:1", nydus_bytes=size)


def wait_http_ok(url: str) -> None:
    """Poll *url* every 10 ms until it answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.01)
    raise TimeoutError(f"{url} never answered 200")


def summarize(case: Case, image: Image, runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per snapshotter and the ratios the targets are about."""
    med = {snap: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for snap, rs in runs.items()}
    lazy, oci = med["lazyfs"], med["overlayfs"]
    return {"case": case.name, "image": case.image, "command": list(case.command), "rate_mbit": case.rate_mbit,
            "oci_image_bytes": image.oci_bytes, "nydus_image_bytes": image.nydus_bytes, "runs": runs,
            "median": med, "speedup": oci["e2e_s"] / lazy["e2e_s"],
            "fetched_fraction": lazy["fetched_bytes"] / image.oci_bytes,
            "lazyfs_e2e_over_bound": lazy["e2e_s"] / lazy["bound_s"],
            "overlayfs_e2e_over_bound": oci["e2e_s"] / oci["bound_s"]}


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per case, then the targets."""
    print(f"{'case':13} {'Mbit/s':>6} {'OCI MB':>7} {'E2E ovl s':>9} {'E2E lzfs s':>10} {'speedup':>8} "
          f"{'fetch MB':>8} {'fetch %':>7} {'warm s':>6} {'bound s':>7} {'E2E/bnd':>7} {'ovl/bnd':>7}")
    for r in results:
        lazy, oci = r["median"]["lazyfs"], r["median"]["overlayfs"]
        print(f"{r['case']:13} {r['rate_mbit']:6d} {r['oci_image_bytes'] / 1e6:7.1f} {oci['e2e_s']:9.2f} "
              f"{lazy['e2e_s']:10.2f} {r['speedup']:7.1f}x {lazy['fetched_bytes'] / 1e6:8.1f} "
              f"{100 * r['fetched_fraction']:6.1f}% {lazy['warm_s']:6.2f} {lazy['bound_s']:7.2f} "
              f"{r['lazyfs_e2e_over_bound']:6.2f}x {r['overlayfs_e2e_over_bound']:6.2f}x")
    print("medians; fetch = registry bytes of the cold lazyfs run, % of the OCI image; bound = T_warm + fetched/B "
          "(lazyfs); ovl/bnd = the same ratio for overlayfs")
    if any(r["optimized"] for r in results):
        print("lazyfs images optimized: the case's files recorded with `lazyfs trace` are their prefetch list")
    for r in results:
        if r["rate_mbit"] != 100:
            continue
        checks = [("bytes fetched", r["fetched_fraction"], "<= ", 0.08),
                  ("E2E / bound", r["lazyfs_e2e_over_bound"], "<= ", 1.3)]
        if r["case"] in SPEEDUP_TARGETS:
            checks.insert(0, ("E2E speedup", r["speedup"], ">= ", SPEEDUP_TARGETS[r["case"]]))
        for what, value, op, target in checks:
            ok = value >= target if op == ">= " else value <= target
            print(f"target {r['case']}: {what} {value:.3g} {op}{target:g}: {'met' if ok else 'MISSED'}")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of median E2E per case and snapshotter, if matplotlib is installed."""
    plt = pyplot()
    labels = [f"{r['case']}\n{r['rate_mbit']} Mbit/s" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(results), 4))
    ax.bar([x - 0.2 for x in xs], [r["median"]["overlayfs"]["e2e_s"] for r in results], 0.4, label="overlayfs")
    ax.bar([x + 0.2 for x in xs], [r["median"]["lazyfs"]["e2e_s"] for r in results], 0.4, label="lazyfs")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("cold start E2E (s, median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--runs", type=int, default=3, help="cold runs per case and snapshotter (median)")
    parser.add_argument("--mode", default="fuse", choices=("fuse", "erofs"), help="lazyfs mount mode")
    parser.add_argument("--optimize", action="store_true",
                        help="lazyfs runs use images with the case's recorded prefetch list (see above)")
    parser.add_argument("--json", type=Path, default=Path("cold_start.json"), help="results file")
    parser.add_argument("--png", type=Path, default=Path("cold_start.png"), help="chart file (needs matplotlib)")
    args = parser.parse_args()
    unknown = [name for name in args.cases.split(",") if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    cases = [CASES[name] for name in args.cases.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("cold_start needs root (network namespaces, containerd, drop_caches)")
    work = Path(tempfile.mkdtemp(prefix="lzcs-", dir="/tmp"))  # short: unix socket paths
    results = []
    containerd: Containerd | None = None
    try:
        with namespace_link() as link, namespace_registry(work / "registry", link) as registry:
            http_port = free_port()  # one per run: benchmarks started side by side do not answer each other
            images = build_images({c.image for c in cases}, work, registry, http_port)
            cache = work / "cache"
            config = work / "snapshotter.toml"
            config.write_text(f'[lazyfs]\nmode = "{args.mode}"\ncache_dir = "{cache}"\n'
                              f'plain_http = ["{link.ns_addr}"]\n')
            snapshotter = SnapshotterProcess(work / "snapshotter-root", work / "snapshotter.sock",
                                             work / "snapshotter.log", config=config, run_dir=work / "run")
            containerd = Containerd(work, snapshotter, namespace=f"lzbench-{secrets.token_hex(4)}")
            snapshotter.start()
            containerd.start()
            bench = Bench(containerd, cache, registry, http_port)
            lazy_images = {c.name: optimize(bench, c, images[c.image], work / "run") if args.optimize
                           else images[c.image] for c in cases}
            for case in cases:
                link.shape(case.rate_mbit)
                image = lazy_images[case.name]
                runs: dict[str, list[dict[str, float]]] = {"overlayfs": [], "lazyfs": []}
                for i in range(args.runs):
                    for snap, ref in (("overlayfs", image.oci), ("lazyfs", image.nydus)):
                        runs[snap].append(bench.measure(case, snap, ref))
                        m = runs[snap][-1]
                        print(f"{case.name} run {i + 1} {snap:9}: E2E {m['e2e_s']:.2f} s, warm {m['warm_s']:.2f} s, "
                              f"fetched {m['fetched_bytes'] / 1e6:.1f} MB", flush=True)
                results.append({**summarize(case, image, runs), "optimized": args.optimize})
    finally:
        if containerd is not None:
            containerd.stop()
            containerd.snapshotter.stop()
        unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"results written to {args.json}")
    plot(results, args.png)


if __name__ == "__main__":
    main()
