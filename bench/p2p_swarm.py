"""P2P swarm on loopback: N peers fetch one registry blob at once through `lazyfs peer`, against N plain
downloads of the same blob straight from the registry in the same run.

One docker-registry (127.0.0.1) holds a random blob of S bytes. Per N, each run has two parts (``sync``
first): registry-only, N concurrent ``curl`` downloads of the blob; swarm, a fresh ``lazyfs scheduler``, one
seed peer and N peers (separate processes), all N ``lazyfs get`` started at once. Both report the wall time
until the last download finished and origin bytes / S, counted from the registry's own access log; every
output's sha256 is checked. For the swarm, where the peers' bytes came from (other peers, the seed, the
origin) comes from their metrics, and CPU seconds per GB moved is each daemon's CPU time (/proc, from just
before the gets to just after they finished; start-up excluded) over the bytes it received plus the bytes it
served (GB = 1e9 bytes). Medians over ``--runs``; JSON via ``--json``.

Targets (the issue): origin bytes <= 1.05 x S at every N; <= 1 CPU-second per GB a peer receives and serves.

``--netns`` (root): the same two parts across hosts of the test bed (tests/hosts.py): network namespaces on a
bridge, each host's link tc-limited to ``--rate`` Mbit/s both ways, the registry alone in an origin namespace
whose upload is limited to ``--origin-rate``. Scheduler and seed peer share host 0; the N peers (and, for
registry-only, the N curls) run on hosts 1..N. Default blob 250 MB. Each time is compared with the Kumar-Ross
lower bound for distributing S to N hosts, max(S/C, S/D, N*S/(C+N*U)), C = origin upload, D = host download,
U = host upload. Targets: swarm <= 1.3 x the bound at N = 8 and flat in N, origin bytes <= 1.05 x S. Anchors:
Dragonfly v1 about 1.5 x the bound, Kraken's median at the bound, Dragonfly's origin traffic about 1.5 copies at
500 pods. With 2 cores for up to 10 Python daemons a run may be CPU-bound: the table shows the CPU the measured
processes used over wall x cores, and the whole machine's busy share (other work on it counts too).
``--png PATH``: time vs N for swarm, registry-only and the bound (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import pyplot
from tests.hosts import Host, HostBed, HostSwarm, netns_registry, tools_missing
from tests.registry_fixtures import RegistryServer, run_registry
from tests.swarm import PeerDaemon, Swarm, push_blob, sha256_file, swarm

MiB = 1 << 20
CPUS = os.cpu_count() or 1
GB = 1e9
REPO = "bench/swarm"
TIMEOUT = 1800.0  # seconds for all downloads of one part
ORIGIN_TARGET = 1.05  # origin bytes / S
CPU_TARGET = 1.0  # CPU seconds per GB a peer receives and serves
SOURCES = ("peer", "seed", "source")  # lazyfs_peer_<source>_bytes_total: where a peer's pieces came from
BOUND_TARGET = 1.3  # swarm time / Kumar-Ross bound at N = 8 (--netns)
BOUND_TARGET_N = 8
CPU_BOUND = 0.9  # share of all cores busy beyond which a --netns time is flagged as CPU-limited
ANCHORS = "Dragonfly v1 ~1.5x the bound, Kraken median ~1.0x the bound, Dragonfly origin ~1.5 S at 500 pods"


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """User + system CPU seconds of every child reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(before: tuple[int, int]) -> float:
    """Share of all CPUs' time the machine was busy since *before* (from :func:`machine_jiffies`)."""
    busy, total = machine_jiffies()
    return (busy - before[0]) / max(1, total - before[1])


def registry_process_cpu(registry: RegistryServer) -> float:
    """CPU seconds the docker-registry process used so far."""
    assert registry.process is not None
    return process_cpu(registry.process.pid)


def wait_all(processes: Sequence[subprocess.Popen[bytes]], what: str) -> None:
    """Wait for *processes* (all started together), failing loudly with the first failure's error output."""
    deadline = time.monotonic() + TIMEOUT
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise SystemExit(f"{what} did not finish in {TIMEOUT:.0f} s") from None
        if process.returncode != 0:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise SystemExit(f"{what} failed with exit code {process.returncode}: {err.strip()}")


def check_outputs(outputs: Sequence[Path], digest: str) -> None:
    """Every output must hold the blob; they are removed afterwards."""
    for out in outputs:
        if (got := sha256_file(out)) != digest:
            raise SystemExit(f"{out} has digest {got}, not {digest}")
        out.unlink()


def registry_only(registry: RegistryServer, url: str, digest: str, size: int, n: int, work: Path,
                  hosts: Sequence[Host] = ()) -> dict[str, float]:
    """N concurrent curl downloads of the blob (inside *hosts* if given): wall seconds, origin bytes / S, curl CPU
    seconds per GB."""
    outputs = [work / f"direct{i}" for i in range(n)]
    prefixes = [h.prefix for h in hosts] if hosts else [[] for _ in range(n)]
    subprocess.run(["sync"], check=True)  # the previous part's writeback must not slow this one
    before, cpu_before, registry_cpu = registry.bytes_served(), children_cpu(), registry_process_cpu(registry)
    machine = machine_jiffies()
    start = time.perf_counter()
    procs = [subprocess.Popen([*prefix, "curl", "-sSf", "-o", str(out), url], stderr=subprocess.PIPE)
             for prefix, out in zip(prefixes, outputs, strict=True)]
    wait_all(procs, "curl")
    seconds = time.perf_counter() - start
    busy = machine_busy(machine)
    clients_cpu = children_cpu() - cpu_before
    origin = registry.bytes_served() - before
    registry_cpu = registry_process_cpu(registry) - registry_cpu
    check_outputs(outputs, digest)
    return {"seconds": seconds, "origin_bytes": origin, "origin_over_size": origin / size,
            "client_cpu_s_per_gb": clients_cpu / (n * size / GB), "registry_cpu_s": registry_cpu,
            "cpu_share": (clients_cpu + registry_cpu) / (seconds * CPUS), "machine_busy": busy}


def wait_announced(daemons: Sequence[PeerDaemon]) -> None:
    """Wait until every daemon announced its host to the scheduler."""
    deadline = time.monotonic() + 30
    for daemon in daemons:
        while "host announced" not in daemon.log_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"{daemon.name} never announced its host:\n{daemon.log_text()[-2000:]}")
            time.sleep(0.05)


def daemon_usage(name: str, cpu: float, metrics: dict[str, float]) -> dict[str, float | str]:
    """Bytes one daemon received (by source) and served, and its CPU seconds per GB of both."""
    received = {f"{s}_bytes": metrics[f"lazyfs_peer_{s}_bytes_total"] for s in SOURCES}
    moved = sum(received.values()) + metrics["lazyfs_peer_upload_bytes_total"]
    return {"name": name, **received, "served_bytes": metrics["lazyfs_peer_upload_bytes_total"], "cpu_s": cpu,
            "cpu_s_per_gb": cpu / (moved / GB) if moved else float("nan")}


def swarm_run(registry: RegistryServer, url: str, digest: str, size: int, n: int, work: Path,
              bed: HostBed | None = None) -> tuple[dict[str, float], list[dict[str, float | str]]]:
    """A fresh scheduler + seed + N peers, N gets at once: the summary and per-daemon usage (seed first).

    With *bed*, the scheduler and seed run on host 0 and peer i on host i + 1; else all on loopback."""
    root = work / f"swarm-{n}"
    outputs = [work / f"out{i}" for i in range(n)]
    try:
        with contextlib.ExitStack() as stack:
            if bed is None:
                group: Swarm = stack.enter_context(swarm(root))
                sched = group.scheduler()
                seed = group.peer("seed", [sched], seed=True)
                peers = [group.peer(f"peer{i}", [sched]) for i in range(n)]
            else:
                hosts = stack.enter_context(swarm(root, HostSwarm))
                sched = hosts.scheduler_on(bed.hosts[0])
                seed = hosts.peer_on(bed.hosts[0], "seed", [sched], seed=True)
                peers = [hosts.peer_on(bed.hosts[i + 1], f"peer{i}", [sched]) for i in range(n)]
            daemons = [seed, *peers]
            wait_announced(daemons)
            subprocess.run(["sync"], check=True)
            cpu = {d.name: process_cpu(d.process.pid) for d in daemons}
            before, cpu_before, registry_cpu = registry.bytes_served(), children_cpu(), registry_process_cpu(registry)
            machine = machine_jiffies()
            start = time.perf_counter()
            if bed is None:
                gets = [group.get(p, url, out) for p, out in zip(peers, outputs, strict=True)]
            else:
                gets = [hosts.get_on(bed.hosts[i + 1], p, url, out) for i, (p, out) in
                        enumerate(zip(peers, outputs, strict=True))]
            wait_all(gets, "lazyfs get")
            seconds = time.perf_counter() - start
            busy = machine_busy(machine)
            clients_cpu = children_cpu() - cpu_before
            for d in daemons:
                cpu[d.name] = process_cpu(d.process.pid) - cpu[d.name]
            usage = [daemon_usage(d.name, cpu[d.name], d.metrics()) for d in daemons]
            origin = registry.bytes_served() - before
            registry_cpu = registry_process_cpu(registry) - registry_cpu
        check_outputs(outputs, digest)
    except (SystemExit, RuntimeError) as exc:  # RuntimeError: a daemon did not start
        logs = Path(tempfile.mkdtemp(prefix="lzswarm-logs-"))
        for log in root.glob("*.log"):
            shutil.copy(log, logs)
        raise SystemExit(f"swarm of {n}: {exc}\n(daemon logs kept in {logs})") from exc
    finally:
        shutil.rmtree(root, ignore_errors=True)
    received = {s: sum(float(u[f"{s}_bytes"]) for u in usage[1:]) for s in SOURCES}
    total = sum(received.values())
    peer_cpu = [float(u["cpu_s_per_gb"]) for u in usage[1:]]
    summary = {"seconds": seconds, "origin_bytes": origin, "origin_over_size": origin / size,
               **{f"from_{s}_fraction": received[s] / total for s in SOURCES},
               "peer_cpu_s_per_gb_mean": statistics.fmean(peer_cpu), "peer_cpu_s_per_gb_max": max(peer_cpu),
               "seed_cpu_s_per_gb": float(usage[0]["cpu_s_per_gb"]),
               "client_cpu_s_per_gb": clients_cpu / (n * size / GB), "registry_cpu_s": registry_cpu,
               "cpu_share": (sum(float(u["cpu_s"]) for u in usage) + clients_cpu + registry_cpu) / (seconds * CPUS),
               "machine_busy": busy}
    return summary, usage


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key medians over *runs*."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def flag(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def print_table(results: list[dict[str, Any]], size: int) -> None:
    """One row per N, then the targets."""
    print(f"{'N':>2} {'direct s':>8} {'swarm s':>8} {'swarm/dir':>9} {'orig/S dir':>10} {'orig/S swm':>10} "
          f"{'% peers':>7} {'% seed':>6} {'% orig':>6} {'CPU/GB mean':>11} {'max':>6} {'seed':>6} {'get':>6} "
          f"{'curl':>6}")
    for r in results:
        d, s = r["direct"], r["swarm"]
        print(f"{r['n']:2d} {d['seconds']:8.2f} {s['seconds']:8.2f} {s['seconds'] / d['seconds']:8.2f}x "
              f"{d['origin_over_size']:10.3f} {s['origin_over_size']:10.3f} {100 * s['from_peer_fraction']:7.1f} "
              f"{100 * s['from_seed_fraction']:6.1f} {100 * s['from_source_fraction']:6.1f} "
              f"{s['peer_cpu_s_per_gb_mean']:11.2f} {s['peer_cpu_s_per_gb_max']:6.2f} {s['seed_cpu_s_per_gb']:6.2f} "
              f"{s['client_cpu_s_per_gb']:6.2f} {d['client_cpu_s_per_gb']:6.2f}")
    print(f"medians; blob S = {size / MiB:.0f} MiB; direct = N concurrent curl downloads from the registry; swarm = "
          "scheduler + seed + N peers, N `lazyfs get` at once;\norig/S = registry access-log bytes / S; % = share "
          "of the peers' received bytes from other peers / the seed / the origin; CPU/GB = daemon CPU s per GB\n"
          "received + served (peers: mean, max; the seed), 'get' = the `lazyfs get` clients' CPU s per GB written,\n"
          "'curl' = the same-run baseline: curl's CPU s per GB received from the registry and written to a file")
    for r in results:
        s = r["swarm"]
        print(f"target N={r['n']}: origin {s['origin_over_size']:.3f} x S <= {ORIGIN_TARGET}: "
              f"{flag(s['origin_over_size'] <= ORIGIN_TARGET)}; peer CPU max {s['peer_cpu_s_per_gb_max']:.2f} s/GB "
              f"<= {CPU_TARGET:g}: {flag(s['peer_cpu_s_per_gb_max'] <= CPU_TARGET)}; seed CPU "
              f"{s['seed_cpu_s_per_gb']:.2f} s/GB <= {CPU_TARGET:g}: {flag(s['seed_cpu_s_per_gb'] <= CPU_TARGET)}; "
              f"peer mean / curl {s['peer_cpu_s_per_gb_mean'] / r['direct']['client_cpu_s_per_gb']:.2f}x")


def kumar_ross_bound(size: int, n: int, origin_up: float, down: float, up: float) -> float:
    """Least seconds to get *size* bytes to each of *n* hosts: max(S/C, S/D, N*S/(C+N*U)), rates in bytes/s."""
    return max(size / origin_up, size / down, n * size / (origin_up + n * up))


def add_bounds(results: list[dict[str, Any]], rate_mbit: float, origin_mbit: float) -> None:
    """Put the bound and each part's time over it into every result."""
    host, origin = rate_mbit * 1e6 / 8, origin_mbit * 1e6 / 8
    for r in results:
        r["bound_s"] = kumar_ross_bound(r["size"], r["n"], origin, host, host)
        for part in ("direct", "swarm"):
            r[part]["over_bound"] = r[part]["seconds"] / r["bound_s"]


def cpu_note(part: dict[str, float]) -> str:
    """Whether a part's time says more about the CPUs than about the links."""
    if part["cpu_share"] >= CPU_BOUND:
        return f"; CPU-bound: the measured processes used {100 * part['cpu_share']:.0f} % of {CPUS} cores"
    if part["machine_busy"] >= CPU_BOUND:
        return (f"; machine CPU-saturated ({100 * part['machine_busy']:.0f} % busy, the measured processes "
                f"{100 * part['cpu_share']:.0f} %): other load inflated the time")
    return ""


def print_netns_table(results: list[dict[str, Any]], size: int, rate_mbit: float, origin_mbit: float) -> None:
    """One row per N (times against the bound, origin bytes, sources, CPU), then targets and anchors."""
    print(f"{'N':>2} {'bound s':>7} {'swarm s':>7} {'/bound':>6} {'direct s':>8} {'/bound':>6} {'orig/S swm':>10} "
          f"{'orig/S dir':>10} {'% peers':>7} {'% seed':>6} {'% orig':>6} {'CPU swm':>7} {'machine':>7} "
          f"{'CPU dir':>7}")
    for r in results:
        d, s = r["direct"], r["swarm"]
        print(f"{r['n']:2d} {r['bound_s']:7.2f} {s['seconds']:7.2f} {s['over_bound']:5.2f}x {d['seconds']:8.2f} "
              f"{d['over_bound']:5.2f}x {s['origin_over_size']:10.3f} {d['origin_over_size']:10.3f} "
              f"{100 * s['from_peer_fraction']:7.1f} {100 * s['from_seed_fraction']:6.1f} "
              f"{100 * s['from_source_fraction']:6.1f} {100 * s['cpu_share']:6.0f}% {100 * s['machine_busy']:6.0f}% "
              f"{100 * d['cpu_share']:6.0f}%")
    print(f"medians; S = {size / 1e6:.0f} MB; hosts on a bridge, each link {rate_mbit:g} Mbit/s both ways (tbf), "
          f"origin upload {origin_mbit:g} Mbit/s;\nswarm = scheduler + seed on host 0, N peers on hosts 1..N, N "
          "`lazyfs get` at once; direct = N curls from the origin at once;\nbound = max(S/C, S/D, N*S/(C+N*U)) "
          "(Kumar-Ross); orig/S = registry access-log bytes / S; % = share of the peers' received bytes\nfrom other "
          f"peers / the seed / the origin; CPU = CPU seconds of the measured processes / (wall x {CPUS} cores); "
          "machine = the whole machine's busy share.\nNote: tbf counts frame bytes, so TCP payload tops out near 97 % "
          "of the link rate (a perfect run is ~1.03x the bound).")
    for r in results:
        s = r["swarm"]
        print(f"target N={r['n']}: origin {s['origin_over_size']:.3f} x S <= {ORIGIN_TARGET}: "
              f"{flag(s['origin_over_size'] <= ORIGIN_TARGET)}; swarm {s['over_bound']:.2f}x the bound"
              + (f" <= {BOUND_TARGET}: {flag(s['over_bound'] <= BOUND_TARGET)}" if r["n"] == BOUND_TARGET_N else "")
              + cpu_note(s))
    if not any(r["n"] == BOUND_TARGET_N for r in results):
        print(f"target <= {BOUND_TARGET}x the bound at N={BOUND_TARGET_N}: not measured (N={BOUND_TARGET_N} not run)")
    ratios = [r["swarm"]["over_bound"] for r in results]
    print(f"flat in N: swarm/bound from {min(ratios):.2f}x to {max(ratios):.2f}x "
          f"(spread {max(ratios) - min(ratios):.2f})")
    print(f"anchors: {ANCHORS}")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Time vs N for the swarm, registry-only and the bound, if matplotlib is importable."""
    plt = pyplot()
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["swarm"]["seconds"] for r in results], "o-", label="swarm (lazyfs peers)")
    ax.plot(ns, [r["direct"]["seconds"] for r in results], "s-", label="registry only (curl)")
    ax.plot(ns, [r["bound_s"] for r in results], "k--", label="Kumar-Ross bound")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("hosts N")
    ax.set_ylabel("time until all hosts finished (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart written to {path}")


def run_netns(args: argparse.Namespace, ns: list[int], size: int, work: Path) -> list[dict[str, Any]]:
    """Both parts per N across bed hosts (the registry in the origin namespace)."""
    if reason := tools_missing():
        raise SystemExit(f"--netns {reason}")
    results = []
    with HostBed(max(ns) + 1, rate_mbit=args.rate, origin_mbit=args.origin_rate) as bed, \
            netns_registry(work / "registry", bed.origin) as registry:
        digest = push_blob(registry.url, REPO, os.urandom(size))
        url = f"{registry.url}/v2/{REPO}/blobs/{digest}"
        for n in ns:
            directs, swarms, usages = [], [], []
            for i in range(args.runs):
                direct = registry_only(registry, url, digest, size, n, work, bed.hosts[1:n + 1])
                summary, usage = swarm_run(registry, url, digest, size, n, work, bed)
                directs.append(direct)
                swarms.append(summary)
                usages.append(usage)
                print(f"N={n} run {i + 1}: direct {direct['seconds']:.2f} s (origin {direct['origin_over_size']:.3f} "
                      f"x S), swarm {summary['seconds']:.2f} s (origin {summary['origin_over_size']:.3f} x S, CPU "
                      f"{100 * summary['cpu_share']:.0f} %, machine {100 * summary['machine_busy']:.0f} %)", flush=True)
            results.append({"n": n, "size": size, "direct": medians(directs), "swarm": medians(swarms),
                            "runs": [{"direct": d, "swarm": s, "daemons": u}
                                     for d, s, u in zip(directs, swarms, usages, strict=True)]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, help="blob size S in MiB (default 256 MiB; --netns: 250 MB)")
    parser.add_argument("--peers", default="1,2,4,8", help="comma-separated swarm sizes N")
    parser.add_argument("--runs", type=int, default=1, help="runs per N (medians)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work-dir", help="parent of the scratch directory (default: system temp)")
    parser.add_argument("--netns", action="store_true", help="hosts as network namespaces with tc-limited links")
    parser.add_argument("--rate", type=float, default=100, help="--netns: each host's link, Mbit/s both ways")
    parser.add_argument("--origin-rate", type=float, default=100, help="--netns: the origin's upload, Mbit/s")
    parser.add_argument("--png", type=Path, help="--netns: chart of time vs N (needs matplotlib)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is not installed")
    size = int(args.size * MiB) if args.size else 250_000_000 if args.netns else 256 * MiB
    ns = [int(x) for x in args.peers.split(",")]
    if args.netns:
        with tempfile.TemporaryDirectory(prefix="lzswarm-", dir=args.work_dir) as tmp:
            results = run_netns(args, ns, size, Path(tmp))
        add_bounds(results, args.rate, args.origin_rate)
        print_netns_table(results, size, args.rate, args.origin_rate)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
            print(f"results written to {args.json}")
        if args.png:
            plot(results, args.png)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="lzswarm-", dir=args.work_dir) as tmp:  # short: unix socket paths
        work = Path(tmp)
        with run_registry(work / "registry") as registry:
            digest = push_blob(registry.url, REPO, os.urandom(size))
            url = f"{registry.url}/v2/{REPO}/blobs/{digest}"
            subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True)  # warm-up: first read is slower
            for n in ns:
                directs, swarms, usages = [], [], []
                for i in range(args.runs):
                    direct = registry_only(registry, url, digest, size, n, work)
                    summary, usage = swarm_run(registry, url, digest, size, n, work)
                    directs.append(direct)
                    swarms.append(summary)
                    usages.append(usage)
                    print(f"N={n} run {i + 1}: direct {direct['seconds']:.2f} s (origin "
                          f"{direct['origin_over_size']:.3f} x S), swarm {summary['seconds']:.2f} s (origin "
                          f"{summary['origin_over_size']:.3f} x S, peer CPU {summary['peer_cpu_s_per_gb_mean']:.2f} "
                          "s/GB)", flush=True)
                results.append({"n": n, "size": size, "direct": medians(directs), "swarm": medians(swarms),
                                "runs": [{"direct": d, "swarm": s, "daemons": u}
                                         for d, s, u in zip(directs, swarms, usages, strict=True)]})
    print_table(results, size)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
