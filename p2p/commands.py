"""The P2P subcommands of ``lazyfs``: ``peer``, ``get`` and ``tasks`` (and ``scheduler``, served by scheduler/)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from lazyfs.progress import Progress, human
from p2p import grpc_bridge
from p2p.api import common, dfdaemon, download_stub
from p2p.config import PeerConfig
from p2p.taskid import blob_digest_task_id

Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]
DEFAULT_SOCKET = PeerConfig.socket


class CommandError(OSError):
    """A failure the CLI reports in one line."""


def cmd_peer(args: argparse.Namespace) -> int:
    """Run a peer daemon (``--seed``: a seed peer, the only kind that fetches from the origin unprompted)."""
    from p2p import tls
    from p2p.daemon import run

    overrides = {k: getattr(args, k) for k in ("data_dir", "socket", "ip", "hostname", "listen", "grpc_port",
                                               "vortex_port", "metrics_port", "idc", "location", "upload_limit",
                                               "download_limit", "back_to_source_limit", "max_uploads", "proxy_port",
                                               "proxy_listen", "registry_mirror", "proxy_ca_cert",
                                               "proxy_ca_key", "origin_ca_bundle")}
    overrides["schedulers"] = args.scheduler or None
    overrides["seed"] = True if args.seed else None
    overrides["proxy_intercept_hosts"] = args.proxy_intercept_host or None
    config = PeerConfig.load(Path(args.config) if args.config else None, **overrides)
    tls.check(config)
    args.log_to_stderr()
    run(config)
    return 0


def _download(args: argparse.Namespace) -> Any:
    headers = dict(_header(h) for h in args.header)
    download = common.Download(url=args.url, type=common.STANDARD, request_header=headers,
                               output_path=str(Path(args.output).resolve()), overwrite=True,
                               disable_back_to_source=args.disable_back_to_source,
                               force_hard_link=args.force_hard_link,
                               filtered_query_params=args.filtered_query_param, priority=common.LEVEL0)
    for name in ("tag", "application", "digest"):
        if getattr(args, name):
            setattr(download, name, getattr(args, name))
    if args.piece_length:
        download.piece_length = args.piece_length
    if not args.digest and (hexdigest := blob_digest_task_id(args.url)) and len(hexdigest) == 64:
        download.digest = f"sha256:{hexdigest}"  # a registry blob names its own digest: check it
    return download


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def cmd_get(args: argparse.Namespace) -> int:
    """Download a URL through the local peer daemon (dfget's job)."""
    download = _download(args)
    progress = Progress(enabled=not args.quiet)
    started = time.monotonic()
    done = 0
    with grpc_bridge.channel(f"unix:{args.socket}") as chan:
        stub = download_stub(chan)
        try:
            for answer in stub.DownloadTask(dfdaemon.DownloadTaskRequest(download=download), timeout=args.timeout):
                if answer.HasField("download_task_started_response"):
                    progress.start(f"get {answer.task_id[:12]}", answer.download_task_started_response.content_length)
                else:
                    done += answer.download_piece_finished_response.piece.length
                    progress.update(done)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise CommandError(f"no peer daemon answers on {args.socket}: start `lazyfs peer`") from None
            raise CommandError(f"download failed: {exc.details()}") from None
    elapsed = time.monotonic() - started
    progress.done(f"{human(done)} in {elapsed:.1f} s to {args.output}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """List the local peer's tasks and their piece state."""
    rows = []
    with grpc_bridge.channel(f"unix:{args.socket}") as chan:
        stub = download_stub(chan)
        try:
            listing = stub.ListLocalTasks(dfdaemon.ListLocalTasksRequest(), timeout=10)
            for local in listing.tasks:
                task = stub.StatTask(dfdaemon.StatTaskRequest(task_id=local.task_id), timeout=10)
                rows.append({"task_id": task.id, "url": task.url, "state": task.state,
                             "content_length": task.content_length, "piece_count": task.piece_count,
                             "pieces_held": len(task.pieces)})
        except grpc.RpcError as exc:
            raise CommandError(f"peer daemon on {args.socket}: {exc.details()}") from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'TASK':<14}{'STATE':<11}{'PIECES':>13}{'SIZE':>12}  URL")
    for row in rows:
        pieces = f"{row['pieces_held']}/{row['piece_count']}"
        size = human(row["content_length"])
        print(f"{row['task_id'][:12]:<14}{row['state']:<11}{pieces:>13}{size:>12}  {row['url']}")
    return 0


def register(add: Add, log_to_stderr: Callable[[], None]) -> None:
    """Add the P2P subcommands to the ``lazyfs`` parser."""
    p = add("peer", cmd_peer, "Run a P2P peer daemon (Dragonfly dfdaemon): serve pieces, download through the swarm.")
    p.set_defaults(log_to_stderr=log_to_stderr)
    p.add_argument("--seed", action="store_true", help="run as a seed peer (goes back to source for the swarm)")
    p.add_argument("--scheduler", action="append", metavar="ADDR", help="scheduler host:port (repeatable)")
    p.add_argument("--data-dir", help=f"task content and state (default {PeerConfig.data_dir})")
    p.add_argument("--config", help="TOML config file; options override it")
    p.add_argument("--socket", help=f"unix socket for local clients (default {DEFAULT_SOCKET})")
    p.add_argument("--ip", help="address other peers reach this one at (default 127.0.0.1)")
    p.add_argument("--hostname", help="host name in the host id (default: this machine's)")
    p.add_argument("--listen", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, help="DfdaemonUpload gRPC port (default 4000; 0 picks one)")
    p.add_argument("--vortex-port", type=int, help="Vortex piece port (default 4005; 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 4002; 0 = off)")
    p.add_argument("--idc", help="IDC announced to the scheduler")
    p.add_argument("--location", help="location announced to the scheduler (a|b|c)")
    for name in ("upload", "download", "back-to-source"):
        p.add_argument(f"--{name}-limit", type=_rate, help=f"{name} bandwidth limit, bytes/s (e.g. 50M; 0 = none)")
    p.add_argument("--max-uploads", type=int, help="concurrent piece uploads served (default 200)")
    p.add_argument("--proxy-port", type=int, help="registry mirror / HTTP proxy port (default 0 = off; "
                   "Dragonfly uses 4001)")
    p.add_argument("--proxy-listen", help="address the proxy listens on (default 127.0.0.1)")
    p.add_argument("--registry-mirror", help="upstream for mirror requests without X-Dragonfly-Registry or ?ns= "
                   "(default https://index.docker.io)")
    p.add_argument("--proxy-ca-cert", help="PEM CA certificate signing the proxy's certificates for intercepted "
                   "HTTPS hosts")
    p.add_argument("--proxy-ca-key", help="its unencrypted PEM private key (RSA or ECDSA)")
    p.add_argument("--proxy-intercept-host", action="append", metavar="REGEX", help="intercept CONNECT tunnels "
                   "whose host:port matches (repeatable); others stay blind tunnels")
    p.add_argument("--origin-ca-bundle", help="PEM CA certificates trusted for HTTPS origins, besides the system's")

    p = add("get", cmd_get, "Download a URL or registry blob through the local peer (Dragonfly's dfget).")
    p.add_argument("url", metavar="URL")
    p.add_argument("-O", "--output", required=True, help="file to write")
    p.add_argument("-H", "--header", action="append", default=[], help="request header 'Name: value' (repeatable)")
    p.add_argument("--digest", help="expected digest of the content (sha256:HEX); registry blob URLs imply it")
    p.add_argument("--tag", help="task tag (part of the task id)")
    p.add_argument("--application", help="application (part of the task id)")
    p.add_argument("--piece-length", type=_rate, help="piece length (4 MiB..64 MiB; part of the task id)")
    p.add_argument("--filtered-query-param", action="append", default=[], help="query key left out of the task id")
    p.add_argument("--disable-back-to-source", action="store_true", help="fail rather than fetch from the origin")
    p.add_argument("--force-hard-link", action="store_true",
                   help="fail rather than copy when the output cannot be a hard link to the peer's cached content "
                        "(by default a link is made when possible, else a copy)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole download (default 3600)")
    p.add_argument("--socket", default=str(DEFAULT_SOCKET), help=f"peer daemon socket (default {DEFAULT_SOCKET})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    p = add("tasks", cmd_tasks, "List the local peer's tasks and their piece state.")
    p.add_argument("--socket", default=str(DEFAULT_SOCKET), help=f"peer daemon socket (default {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true")


def _rate(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
    lowered = text.strip().lower().removesuffix("b").removesuffix("/s")
    for suffix in sorted(units, key=len, reverse=True):
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * units[suffix])
    return int(lowered)

