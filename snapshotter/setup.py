"""``lazyfs setup containerd``: register the snapshotter in containerd's config (version 2).

Adds ``[proxy_plugins.NAME]`` (``type = "snapshot"``, ``address``) and sets CRI's snapshotter to NAME
with ``disable_snapshot_annotations = false``, so CRI pulls send the labels remote snapshots need. An
existing file is edited in place as text, so its comments and layout survive; the result is parsed
again and must equal the old settings plus ours, or nothing is written.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lazyfs.errors import LazyfsError

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
CRI_TABLE = ("plugins", "io.containerd.grpc.v1.cri", "containerd")

Table = tuple[str, ...]
Value = str | bool


def containerd_settings(name: str, address: str) -> dict[Table, dict[str, Value]]:
    """The tables and keys lazyfs needs in containerd's config."""
    return {
        ("proxy_plugins", name): {"type": "snapshot", "address": address},
        CRI_TABLE: {"snapshotter": name, "disable_snapshot_annotations": False},
    }


def configure_containerd(text: str, name: str, address: str) -> str:
    """*text* (a containerd config, "" for none) with the lazyfs settings merged in."""
    settings = containerd_settings(name, address)
    if not text.strip():
        return "version = 2\n" + "".join(_table_text(table, keys) for table, keys in settings.items())
    document = _parse(text, "existing config")
    if document.get("version") != 2:
        raise LazyfsError("only containerd config version 2 (containerd 1.x) can be edited; "
                          f"this one has version {document.get('version', 1)}")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    for table, keys in settings.items():
        lines = _set_table(lines, document, table, keys)
    merged = "".join(lines)
    if _parse(merged, "merged config") != _expected(document, settings):
        raise LazyfsError("could not merge the settings without changing others; edit the config by hand")
    return merged


def merged_containerd_config(path: Path, name: str, address: str) -> str:
    """The config file at *path* (none if absent) with the lazyfs settings merged in."""
    return configure_containerd(path.read_text() if path.exists() else "", name, address)


def write_containerd_config(path: Path, name: str, address: str) -> bool:
    """Merge the settings into the file at *path* (created if absent); False when nothing changed."""
    return write_file(path, configure_containerd(path.read_text() if path.exists() else "", name, address))


def write_file(path: Path, text: str) -> bool:
    """Write *text* to *path* atomically, keeping its mode; False when it already held exactly that."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _parse(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LazyfsError(f"{what} is not valid TOML: {exc}") from None


def _expected(document: dict[str, Any], settings: Mapping[Table, Mapping[str, Value]]) -> dict[str, Any]:
    expected = copy.deepcopy(document)
    for table, keys in settings.items():
        node = expected
        for part in table:
            node = node.setdefault(part, {})
        node.update(keys)
    return expected


def _set_table(lines: list[str], document: dict[str, Any], table: Table, keys: Mapping[str, Value]) -> list[str]:
    """*lines* with *keys* set in the ``[table]`` section, appending the section if the file has none."""
    header = next((i for i, line in enumerate(lines) if _header_path(line) == table), None)
    if header is None:
        if _lookup(document, table) is not None:
            raise LazyfsError(f"[{_dotted(table)}] is defined inline or with dotted keys; edit the config by hand")
        return [*lines, _table_text(table, keys)]
    end = next((i for i in range(header + 1, len(lines)) if _starts_table(lines[i])), len(lines))
    body = lines[header + 1 : end]
    indent = _indent(lines[header]) + "  "
    for key, value in keys.items():
        current = _lookup(document, (*table, key))
        if type(current) is type(value) and current == value:
            continue  # already set: keep the line as written
        assignment = re.compile(rf'\s*("{re.escape(key)}"|{re.escape(key)})\s*=')
        line = f"{indent}{key} = {_toml_value(value)}\n"
        index = next((i for i, text in enumerate(body) if assignment.match(text)), None)
        if index is None:
            body.insert(_insert_at(body), line)
        else:
            body[index] = _indent(body[index]) + line.lstrip()
    return [*lines[: header + 1], *body, *lines[end:]]


def _insert_at(body: list[str]) -> int:
    """Where a new key goes in a table body: after its last non-blank line."""
    filled = [i for i, line in enumerate(body) if line.strip()]
    return filled[-1] + 1 if filled else 0


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _starts_table(line: str) -> bool:
    """Whether *line* is a ``[table]`` or ``[[array]]`` header."""
    return line.lstrip().startswith("[[") or _header_path(line) is not None


def _header_path(line: str) -> Table | None:
    """The key path of a ``[table]`` header line, or None for anything else."""
    stripped = line.strip()
    if not stripped.startswith("[") or stripped.startswith("[["):
        return None
    try:
        node: Any = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(node, dict) and len(node) == 1:
        part, node = next(iter(node.items()))
        path.append(part)
    return tuple(path)


def _lookup(document: Mapping[str, Any], table: Table) -> object:
    node: object = document
    for part in table:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _dotted(table: Table) -> str:
    return ".".join(part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part) for part in table)


def _toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _table_text(table: Table, keys: Mapping[str, Value]) -> str:
    body = "".join(f"  {key} = {_toml_value(value)}\n" for key, value in keys.items())
    return f"\n[{_dotted(table)}]\n{body}"
