"""``lazyfs setup containerd --mirror``: pull through the local peer's registry mirror (Dragonfly's dfinit job).

containerd reads per-registry ``hosts.toml`` files from its CRI registry ``config_path`` (``ctr`` from
``--hosts-dir``). For one registry, ``<hosts_dir>/<host>/hosts.toml`` names the registry as ``server`` and the
mirror as a ``pull``/``resolve`` host that is told the real upstream in ``X-Dragonfly-Registry``; without a
registry, ``<hosts_dir>/_default/hosts.toml`` sends every registry to the mirror, which then takes the upstream
from containerd's ``?ns=`` parameter. containerd falls back to ``server`` when the mirror fails.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from lazyfs.errors import LazyfsError
from snapshotter.setup import _expected, _lookup, _parse, _set_table, _toml_value, write_file

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
DEFAULT_MIRROR = "http://127.0.0.1:4001"
REGISTRY_TABLE = ("plugins", "io.containerd.grpc.v1.cri", "registry")
_DOCKER_HUB = ("docker.io", "https://index.docker.io")


def registry_server(registry: str) -> tuple[str, str]:
    """``(directory name, server URL)`` for a registry given as a host (https) or a URL."""
    if "://" in registry:
        parts = urlsplit(registry)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LazyfsError(f"bad registry URL {registry!r}")
        host = parts.netloc
        return (_DOCKER_HUB[0] if host in ("index.docker.io", "registry-1.docker.io") else host,
                f"{parts.scheme}://{parts.netloc}")
    host = registry.strip().rstrip("/")
    if not host or "/" in host:
        raise LazyfsError(f"bad registry host {registry!r}")
    return _DOCKER_HUB if host == _DOCKER_HUB[0] else (host, f"https://{host}")


def hosts_toml(mirror: str, registry: str | None = None) -> tuple[str, str]:
    """``(directory name, hosts.toml text)`` sending pulls of *registry* (all registries if None) to *mirror*."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LazyfsError(f"bad mirror URL {mirror!r} (e.g. {DEFAULT_MIRROR})")
    mirror = f"{parts.scheme}://{parts.netloc}"
    host = _toml_value(mirror)
    lines = ["# written by `lazyfs setup containerd --mirror`: pull through the local lazyfs peer\n"]
    directory = "_default"
    if registry is not None:
        directory, server = registry_server(registry)
        lines.append(f"server = {_toml_value(server)}\n")
    lines += [f"\n[host.{host}]\n", '  capabilities = ["pull", "resolve"]\n']
    if registry is not None:
        lines += [f"\n  [host.{host}.header]\n", f"    X-Dragonfly-Registry = {_toml_value(server)}\n"]
    return directory, "".join(lines)


def configure_config_path(text: str, hosts_dir: Path) -> str:
    """*text* (a containerd config, "" for none) with CRI's registry ``config_path`` set to *hosts_dir*."""
    keys = {"config_path": str(hosts_dir)}
    if not text.strip():
        return f"version = 2\n\n[{'.'.join(_quoted(REGISTRY_TABLE))}]\n  config_path = {_toml_value(str(hosts_dir))}\n"
    document = _parse(text, "existing config")
    if document.get("version") != 2:
        raise LazyfsError("only containerd config version 2 (containerd 1.x) can be edited; "
                          f"this one has version {document.get('version', 1)}")
    mirrors = _lookup(document, (*REGISTRY_TABLE, "mirrors"))
    if isinstance(mirrors, dict) and any(mirrors.values()):
        raise LazyfsError("the config sets registry mirrors, which containerd refuses together with config_path; "
                          "move them to hosts.toml files first")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    merged = "".join(_set_table(lines, document, REGISTRY_TABLE, keys))
    if _parse(merged, "merged config") != _expected(document, {REGISTRY_TABLE: keys}):
        raise LazyfsError("could not merge the settings without changing others; edit the config by hand")
    return merged


def _quoted(table: tuple[str, ...]) -> list[str]:
    return [part if part.replace("_", "").replace("-", "").isalnum() else _toml_value(part) for part in table]


def setup_mirror(config: Path, hosts_dir: Path, mirror: str, registry: str | None) -> list[tuple[Path, bool]]:
    """Write the hosts.toml and point containerd's config at *hosts_dir*; ``(path, changed)`` of each file."""
    directory, text = hosts_toml(mirror, registry)
    hosts = hosts_dir / directory / "hosts.toml"
    changed_hosts = write_file(hosts, text)
    old = config.read_text() if config.exists() else ""
    changed_config = write_file(config, configure_config_path(old, hosts_dir))
    return [(hosts, changed_hosts), (config, changed_config)]
