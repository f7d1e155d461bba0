"""This host as Dragonfly's schedulers see it: ``common.v2.Host`` with real CPU, memory, disk and bandwidth."""

from __future__ import annotations

import os
import platform
import shutil

from p2p.api import HOST_TYPE_NORMAL, HOST_TYPE_SEED, common
from p2p.config import PeerConfig


def _memory() -> common.Memory:
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    used = total - available
    return common.Memory(total=total, available=available, used=used, free=info.get("MemFree", 0),
                         used_percent=100.0 * used / total if total else 0.0)


def _disk(path: str) -> common.Disk:
    usage = shutil.disk_usage(path)
    return common.Disk(total=usage.total, free=usage.free, used=usage.used,
                       used_percent=100.0 * usage.used / usage.total if usage.total else 0.0)


def _cpu() -> common.CPU:
    load = os.getloadavg()[0]
    count = os.cpu_count() or 1
    return common.CPU(logical_count=count, physical_count=count, percent=min(100.0, 100.0 * load / count))


def describe(config: PeerConfig, tx_rate: float, *, grpc_port: int, proxy_port: int = 0) -> common.Host:
    """The host message to announce; *tx_rate* is the current upload rate in bytes/s.

    ``port`` and ``download_port`` are both the gRPC upload port, as Dragonfly's client announces them;
    the Vortex port travels in SyncPieces answers.
    """
    uname = platform.uname()
    return common.Host(
        id=config.host_id, type=HOST_TYPE_SEED if config.seed else HOST_TYPE_NORMAL, hostname=config.hostname,
        ip=config.ip, port=grpc_port, download_port=grpc_port, proxy_port=proxy_port, os=uname.system.lower(),
        platform="linux", kernel_version=uname.release, cpu=_cpu(), memory=_memory(),
        disk=_disk(str(config.data_dir)),
        network=common.Network(idc=config.idc, location=config.location,
                               max_tx_bandwidth=config.announced_tx_bandwidth, tx_bandwidth=int(tx_rate * 8),
                               max_rx_bandwidth=config.download_limit * 8 if config.download_limit else 0),
        build=common.Build(git_version="lazyfs", platform=uname.machine),
    )
